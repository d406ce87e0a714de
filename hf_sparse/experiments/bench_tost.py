"""`hf-sparse bench tost`: does the ToST recipe train a pruned SparseViT better than vanilla sparse training?

On Fashion-MNIST, for each mask method and sparsity, trains the same model (same initial weights, mask, data order,
budget and hyper-parameters) with vanilla sparse training, with the full ToST recipe, and with each technique alone,
then prints test accuracy, the change against vanilla and the wall-clock overhead against vanilla.

The mask of a (method, sparsity) pair is computed once (its time is reported as `mask s`, outside the training time)
and saved under `<output_dir>/masks/`; every technique run loads it, so the runs differ only by the technique.
Training time counts the rescaled initialisation (part of the recipe's cost) and excludes evaluation.

The full grid is long on a CPU (6 methods x 2 sparsities x 6 variants, ~2.3 min per epoch per run at the default
size): rows are written to the JSON as they finish, and a rerun skips the rows already there (same settings), so the
grid can be filled in over several sessions. Runs are sequential; a noisy neighbour can shift one run's time.

At small budgets one seed's accuracy moves by points (a +-5 % rescale of the initial weights changes the trajectory):
pass `--seeds 42,43,44` for a mean and standard deviation; the change against vanilla is paired by seed.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tost import TOST_MASK_METHODS, ToSTTrainer, ToSTTrainingArguments, save_masks
from .common import DataArguments, ModelArguments, TrainingClockCallback, build_sparse_vit, compute_accuracy
from .common import prepare_data, training_fields


VANILLA = dict(ghost_soft_neurons=False, ghost_skip_connections=False, rescaled_init="none", label_smoothing=0.0)
TECHNIQUES: dict[str, dict[str, Any]] = {
    "vanilla": VANILLA,
    "full": {},  # ToSTTrainingArguments' defaults: all four techniques
    "ghost_neurons": {**VANILLA, "ghost_soft_neurons": True},
    "ghost_skips": {**VANILLA, "ghost_skip_connections": True},
    "rescaled_init": {**VANILLA, "rescaled_init": "gradinit"},
    "label_smoothing": {**VANILLA, "label_smoothing": 0.1},
    "density_init": {**VANILLA, "rescaled_init": "density"},  # the closed-form LRsI, not in the default grid
}
DEFAULT_TECHNIQUES = ("vanilla", "full", "ghost_neurons", "ghost_skips", "rescaled_init", "label_smoothing")
# Arguments that change results: a JSON written with other values is not mixed with this run.
SETTINGS = ("epochs", "batch_size", "learning_rate", "max_train_samples", "max_eval_samples", "data_seed",
            "mask_scope", "ghost_end_fraction", "rescaled_init_steps", "lottery_ticket_round_fraction")
MODEL_SETTINGS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size")


@dataclass
class ToSTBenchArguments:
    output_dir: str = field(default="outputs/bench_tost", metadata={"help": "Where masks, runs and results go."})
    json: str | None = field(default=None, metadata={"help": "Results file (default <output_dir>/bench_tost.json); "
                                                       "resumed: rows already there are skipped."})
    methods: list[str] = field(default_factory=lambda: list(TOST_MASK_METHODS),
                               metadata={"help": "Mask methods.", "choices": list(TOST_MASK_METHODS)})
    sparsities: list[float] = field(default_factory=lambda: [0.9, 0.95],
                                    metadata={"help": "Fractions of pruned weights, each in [0, 1)."})
    techniques: list[str] = field(default_factory=lambda: list(DEFAULT_TECHNIQUES),
                                  metadata={"help": "Variants (vanilla, the reference, is always added).",
                                            "choices": list(TECHNIQUES)})
    epochs: float = field(default=2.0, metadata={"help": "Training epochs of each run."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on a seeded subset."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    seeds: list[int] = field(default_factory=lambda: [42], metadata={
        "help": "Training seeds (initial weights, mask, data order); the table shows mean and standard deviation: "
        "one seed's accuracy moves by points at small budgets."})
    data_seed: int = field(default=42, metadata={"help": "Picks the --max_train_samples subset."})
    mask_scope: str = field(default="layer", metadata={"help": "Mask thresholds.", "choices": ["layer", "global"]})
    ghost_end_fraction: float = field(default=0.1, metadata={"help": "Ghosts gone after this fraction."})
    rescaled_init_steps: int | None = field(default=None, metadata={"help": "Default: min(180, 2 % of the steps)."})
    lottery_ticket_round_fraction: float = field(default=0.1, metadata={"help": "Steps of each IMP round."})
    fresh: bool = field(default=False, metadata={"help": "Ignore (overwrite) rows already in the JSON."})

    def __post_init__(self):
        if not self.sparsities or any(not 0.0 <= value < 1.0 for value in self.sparsities):
            raise ValueError(f"`sparsities` must be fractions in [0, 1), got {self.sparsities}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct integers, got {self.seeds}.")


ARGUMENTS = (ToSTBenchArguments, ModelArguments)


def _key(method: str, sparsity: float, technique: str | None = None, seed: int | None = None) -> str:
    return f"{method}@{sparsity:g}" + (f"/{technique}" if technique else "") + ("" if seed is None else f"/{seed}")


def _load(path: Path, settings: dict[str, Any], fresh: bool) -> dict[str, Any]:
    if fresh or not path.is_file():
        return {"settings": settings, "rows": [], "mask_seconds": {}}
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    if results.get("settings") != settings:
        raise ValueError(
            f"{path} holds results for other settings {results.get('settings')}; this run has {settings}. "
            "Use another --json/--output_dir, or --fresh to overwrite."
        )
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    temporary = path.with_suffix(".json.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    os.replace(temporary, path)  # a run killed mid-write never leaves a truncated file


def run_one(
    args, data, model_args, method: str, sparsity: float, technique: str, seed: int
) -> tuple[dict[str, Any], float | None]:
    """Train one variant; returns its row and, when it computed the mask, the mask's seconds."""
    mask_file = Path(args.output_dir) / "masks" / f"{method}_{sparsity:g}_seed{seed}.safetensors"
    run_dir = os.path.join(args.output_dir, "runs", f"{method}_{sparsity:g}_{technique}_seed{seed}")
    fields = training_fields(run_dir, args.epochs, args.batch_size, seed, learning_rate=args.learning_rate)
    fields.update(disable_tqdm=True, logging_steps=100)
    training_args = ToSTTrainingArguments(
        **fields,
        mask_method=method,
        sparsity=sparsity,
        mask_scope=args.mask_scope,
        mask_path=str(mask_file) if mask_file.is_file() else None,
        ghost_end_fraction=args.ghost_end_fraction,
        rescaled_init_steps=args.rescaled_init_steps,
        lottery_ticket_round_fraction=args.lottery_ticket_round_fraction,
        **TECHNIQUES[technique],
    )
    model = build_sparse_vit(model_args, data, seed)  # the same initial weights for every variant of a seed
    clock = TrainingClockCallback()
    trainer = ToSTTrainer(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
                          compute_metrics=compute_accuracy, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    setup = trainer.sparsity_setup
    # the mask (shared by all variants) is excluded; the rescaled initialisation is included
    train_seconds = time.perf_counter() - start - setup["mask_seconds"] - clock.evaluation_seconds
    computed_mask = setup["mask_source"] == "computed"
    if computed_mask:
        mask_file.parent.mkdir(parents=True, exist_ok=True)
        save_masks(trainer.model, mask_file, metadata=trainer.mask_metadata)
    metrics = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    row = {
        "method": method,
        "sparsity": sparsity,
        "technique": technique,
        "seed": seed,
        "test_accuracy": metrics["eval_accuracy"],
        "train_seconds": train_seconds,
        "rescaled_init_seconds": setup["rescaled_init_seconds"],
        "rescaled_init_steps": setup.get("rescaled_init_steps", 0),
        "mask_sparsity": setup["mask_sparsity"],
        "optimizer_steps": trainer.state.global_step,
        "ghost_removed_at_step": trainer.ghost_removed_at_step,
        "last_logged_loss": losses[-1] if losses else None,
    }
    return row, (setup["mask_seconds"] if computed_mask else None)


def summarize(rows: list[dict[str, Any]], mask_seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One entry per (method, sparsity, technique): mean and standard deviation of the test accuracy over its seeds,
    mean training seconds, and `accuracy_delta_points` / `overhead` against the vanilla runs of the same seeds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(row["method"], row["sparsity"], row["technique"]), []).append(row)
    summary = []
    for runs in groups.values():
        first = runs[0]
        reference = {r["seed"]: r for r in groups.get(_key(first["method"], first["sparsity"], "vanilla"), [])}
        paired = [(run, reference[run["seed"]]) for run in runs if run["seed"] in reference]
        accuracies = [run["test_accuracy"] for run in runs]
        masks = [mask_seconds[k] for k in (_key(first["method"], first["sparsity"], None, run["seed"]) for run in runs)
                 if mask_seconds and k in mask_seconds]
        summary.append({
            "method": first["method"],
            "sparsity": first["sparsity"],
            "technique": first["technique"],
            "seeds": sorted(run["seed"] for run in runs),
            "test_accuracy": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
            "mask_seconds": statistics.mean(masks) if masks else None,
            # paired by seed: the same initial weights, mask and data order with and without the technique
            "accuracy_delta_points": statistics.mean(100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in paired)
            if paired else None,
            "overhead": sum(a["train_seconds"] for a, _ in paired) / sum(b["train_seconds"] for _, b in paired) - 1.0
            if paired else None,
        })
    return summary


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'method':<15} {'sparsity':>8} {'technique':<16} {'seeds':>5} {'test acc %':>13} {'vs vanilla':>10} "
             f"{'train s':>8} {'overhead':>9} {'mask s':>7}"]
    for row in summary:
        accuracy = f"{100 * row['test_accuracy']:.2f}"
        if row["test_accuracy_std"] is not None:
            accuracy += f"±{100 * row['test_accuracy_std']:.2f}"
        delta = "" if row["accuracy_delta_points"] is None else f"{row['accuracy_delta_points']:+.2f}"
        overhead = "" if row["overhead"] is None else f"{100 * row['overhead']:+.1f}%"
        mask = "" if row["mask_seconds"] is None else f"{row['mask_seconds']:.1f}"
        lines.append(
            f"{row['method']:<15} {row['sparsity']:>8.2f} {row['technique']:<16} {len(row['seeds']):>5} "
            f"{accuracy:>13} {delta:>10} {row['train_seconds']:>8.1f} {overhead:>9} {mask:>7}"
        )
    return "\n".join(lines)


def main(args: ToSTBenchArguments, model_args: ModelArguments) -> list[dict[str, Any]]:
    methods, sparsities, seeds = args.methods, args.sparsities, args.seeds
    techniques = ["vanilla"] + [t for t in args.techniques if t != "vanilla"]  # the reference comes first
    os.makedirs(args.output_dir, exist_ok=True)
    path = Path(args.json or os.path.join(args.output_dir, "bench_tost.json"))
    settings = {name: getattr(args, name, None) for name in SETTINGS if hasattr(args, name)}
    settings.update({name: getattr(model_args, name) for name in MODEL_SETTINGS})
    results = _load(path, settings, args.fresh)
    if args.fresh:
        for stale in (Path(args.output_dir) / "masks").glob("*.safetensors"):
            stale.unlink()  # masks of other settings must not be reused
    done = {_key(r["method"], r["sparsity"], r["technique"], r["seed"]) for r in results["rows"]}

    data = prepare_data(
        DataArguments(max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples),
        seed=args.data_seed,
    )
    grid = [(m, s, t, seed) for seed in seeds for s in sparsities for m in methods for t in techniques]
    selected = {_key(*cell) for cell in grid}
    for index, (method, sparsity, technique, seed) in enumerate(grid, start=1):
        key = _key(method, sparsity, technique, seed)
        prefix = f"[{index}/{len(grid)}] {method} @ {sparsity:g}, {technique}, seed {seed}"
        if key in done:
            print(f"{prefix}: already in {path}, skipped", flush=True)
            continue
        print(f"\n=== {prefix} ===", flush=True)
        row, mask_seconds = run_one(args, data, model_args, method, sparsity, technique, seed)
        results["rows"].append(row)
        if mask_seconds is not None:
            results["mask_seconds"][_key(method, sparsity, None, seed)] = mask_seconds
        results["table"] = summarize(results["rows"], results["mask_seconds"])
        _write(path, results)
        done.add(key)
        print(f"{prefix}: test accuracy {100 * row['test_accuracy']:.2f} %, train {row['train_seconds']:.1f} s "
              f"({len(done & selected)}/{len(grid)} done)", flush=True)

    rows = [row for row in results["rows"] if _key(row["method"], row["sparsity"], row["technique"], row["seed"])
            in selected]
    order = {_key(m, s, t): position for position, (m, s, t, _) in reversed(list(enumerate(grid)))}
    summary = sorted(summarize(rows, results["mask_seconds"]),
                     key=lambda row: order[_key(row["method"], row["sparsity"], row["technique"])])
    print(f"\nFashion-MNIST ({len(data.train)} training images), {args.epochs:g} epoch(s), SparseViT "
          f"{model_args.hidden_size}x{model_args.num_hidden_layers} patch {model_args.patch_size}, {args.mask_scope} masks, "
          f"seeds {','.join(map(str, seeds))}; accuracy mean(±std over seeds), 'vs vanilla' in points, paired by seed:")
    print(format_table(summary))
    print(f"\nResults: {path}")
    return summary
