"""`hf-sparse bench tost`: does the ToST recipe train a pruned network better than vanilla sparse training?

For each model family (transformers' ResNet, where the paper made its claims, and SparseViT), mask method and
sparsity, trains the same model (same initial weights, mask, data order, budget and hyper-parameters) with vanilla
sparse training and with the full ToST recipe over `--seeds`, and with each technique alone over the first
`--technique_seeds` of them; then prints test accuracy (mean and standard deviation over seeds), the change against
vanilla paired by seed, the wall-clock overhead against vanilla, and how many (mask, sparsity) pairs the recipe wins.
`--techniques` also takes "paper" (all four techniques, GradInit, label smoothing 0.1), single techniques joined by
"+" ("ghost_skips+label_smoothing") and settings of the techniques ("label_smoothing=0.2",
"ghost_neurons+ghost_end_fraction=0.5"), for ablations and for finding a family's recipe.

Each family trains with an optimizer and schedule suited to it (`FAMILIES`: SGD with momentum 0.9 at lr 0.1 for the
ResNet, as in the paper; AdamW for the ViT), cosine decay to zero, on a seeded subset of Fashion-MNIST sized so that
the default grid fits in a couple of hours on 2 CPU cores. The families, the regimes and the variants are defined in
`tost_grid.py`; this module runs the grid, keeps its results and summarises them.

`--regime` picks how the CNN sees its images (`REGIMES`). "default" feeds the 28 px images as they are: transformers'
ImageNet stem (7x7 stride 2, max-pool) leaves 7x7, 4x4 and 2x2 maps to the three stages, without augmentation.
"cifar_like" is the paper's setting as far as Fashion-MNIST allows: the images are resized to 56 px so the first stage
works on 14x14 maps (then 7x7, 4x4, as a CIFAR ResNet's 32/16/8 scaled by the stem), training images get the authors'
augmentation (random crop with 7 px zero padding, the 4 px of 32 scaled to 56, and horizontal flips), and the schedule
is 30 epochs; its grid defaults to vanilla against the authors' ghost skips with the Swish ghosts at 95 % and 98 %
sparsity over the six masks and 3 seeds (split it by masks or seeds into files run side by side: the grid resumes and
`--merge` joins). The ViT keeps its own images in every regime.

The mask of a (family, method, sparsity, seed) is computed once, by its vanilla run (its time is reported as
`mask s`, outside the training time), and saved under `<output_dir>/masks/`; every other run of that cell loads it,
so the runs differ only by the technique. Training time counts the rescaled initialisation (part of the recipe's
cost) and excludes evaluation. Rows are written to the JSON as they finish and a rerun skips those already there
(same settings), so the grid survives being stopped. Runs are sequential; to use both cores, run parts of the grid
(seeds, methods) into their own `--json` side by side and join them with `--merge`.

Every run also records the gradient reaching the kept weights over its first steps (`GradientFlowCallback`): what
ToST's techniques are meant to raise. `--gradient_flow_only` stops each run there, for that measurement alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..tost import TOST_MASK_METHODS, GradientFlowCallback, ToSTTrainer, ToSTTrainingArguments, save_masks
from ..tost.arguments import FAMILY_RECIPES
from .common import DataArguments, ModelArguments, TrainingClockCallback, build_model, compute_accuracy
from .common import load_resumable, prepare_data, training_fields, write_json
from .plots import plot_paired_deltas
from .tost_grid import FAMILIES, REGIME_GRIDS, REGIMES, SETTABLE, TECHNIQUES, VANILLA, Family, Regime, check_technique
from .tost_grid import family_model, recipe_family, technique_arguments


@dataclass
class ToSTBenchArguments:
    output_dir: str = field(default="outputs/bench_tost", metadata={"help": "Where masks, runs and results go."})
    json: str | None = field(default=None, metadata={"help": "Results file (default <output_dir>/bench_tost.json); "
                                                       "resumed: rows already there are skipped."})
    families: list[str] = field(default_factory=lambda: list(FAMILIES),
                                metadata={"help": "Model families.", "choices": list(FAMILIES)})
    regime: str = field(default="default", metadata={
        "help": "How the CNN sees its images: 'default' (28 px, no augmentation) or 'cifar_like' (56 px so the first "
                "stage works on 14 px maps, random crop and flip, 30 epochs; see the module docstring).",
        "choices": list(REGIMES)})
    methods: list[str] = field(default_factory=lambda: list(TOST_MASK_METHODS),
                               metadata={"help": "Mask methods.", "choices": list(TOST_MASK_METHODS)})
    sparsities: list[float] | None = field(default=None, metadata={
        "help": "Fractions of pruned weights, each in [0, 1) (default: the regime's, 0.9 0.95 or 0.95 0.98)."})
    techniques: list[str] | None = field(default=None, metadata={
        "help": f"Variants besides vanilla (always run: the reference): {list(TECHNIQUES)}, or single techniques "
                f"and settings of {list(SETTABLE)} joined by '+' (e.g. ghost_skips+label_smoothing, "
                "label_smoothing=0.2). Default: the regime's (full and each technique alone, or paper)."})
    seeds: list[int] | None = field(default=None, metadata={
        "help": "Seeds of vanilla and the full recipe (initial weights, mask, data order); deltas are paired by seed "
                "(default: the regime's, 42 43 44)."})
    technique_seeds: int | None = field(default=None, metadata={
        "help": "How many of the seeds each single technique runs (default: the regime's: 1, or all in cifar_like)."})
    epochs: float | None = field(default=None, metadata={"help": "Training epochs (default: the family's)."})
    learning_rate: float | None = field(default=None, metadata={"help": "Peak learning rate (default: the family's)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Training subset size (default: the family's; 0: the whole training set)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    data_seed: int = field(default=42, metadata={"help": "Picks the training subset."})
    mask_scope: str = field(default="layer", metadata={"help": "Mask thresholds.", "choices": ["layer", "global"]})
    lottery_ticket_round_fraction: float = field(default=0.1, metadata={"help": "Steps of each IMP round."})
    fresh: bool = field(default=False, metadata={"help": "Ignore (overwrite) rows already in the JSON."})
    merge: list[str] = field(default_factory=list, metadata={
        "help": "Results JSONs of other runs with the same settings (e.g. seeds run side by side) whose rows join "
                "this one's before the grid runs; a row already in --json is kept."})
    gradient_flow_steps: int = field(default=20, metadata={
        "help": "Every run records the norm of the gradient reaching the kept weights, before clipping, averaged over "
                "its first optimizer steps (row: masked_gradient_norm; table: 'grad flow', its ratio to vanilla's on "
                "the same seed)."})
    gradient_flow_only: bool = field(default=False, metadata={
        "help": "Stop every run after those steps: a grid of the gradient flow alone, minutes instead of hours (its "
                "settings differ, so use its own --json; the accuracies it records are those of the first steps)."})

    def __post_init__(self):
        if self.regime not in REGIMES:
            raise ValueError(f"`regime` must be one of {list(REGIMES)}, got {self.regime!r}.")
        for name, value in REGIME_GRIDS[self.regime].items():
            if getattr(self, name) is None:
                # the regime's technique seeds count within the seeds asked for (filled before it)
                setattr(self, name, min(value, len(self.seeds)) if name == "technique_seeds" else list(value))
        if not self.sparsities or any(not 0.0 <= value < 1.0 for value in self.sparsities):
            raise ValueError(f"`sparsities` must be fractions in [0, 1), got {self.sparsities}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct integers, got {self.seeds}.")
        for technique in self.techniques:
            check_technique(technique)
        if not 0 <= self.technique_seeds <= len(self.seeds):
            raise ValueError(f"`technique_seeds` must be in [0, {len(self.seeds)}], got {self.technique_seeds}.")
        if not isinstance(self.gradient_flow_steps, int) or self.gradient_flow_steps < 1:
            raise ValueError(f"`gradient_flow_steps` must be a positive integer, got {self.gradient_flow_steps!r}.")

    def family(self, name: str) -> Family:
        """The family's settings with this run's overrides."""
        family = FAMILIES[name]
        overrides = {"epochs": self.epochs, "learning_rate": self.learning_rate}
        family = replace(family, **{key: value for key, value in overrides.items() if value is not None})
        if self.max_train_samples is not None:
            family = replace(family, max_train_samples=self.max_train_samples or None)
        regime_epochs = self.regime_of(name).epochs
        if self.epochs is None and regime_epochs is not None:
            family = replace(family, epochs=regime_epochs)
        return family

    def regime_of(self, name: str) -> Regime:
        """How the family's images are fed in this run's regime."""
        return REGIMES[self.regime].get(name, Regime())

    def data_arguments(self, name: str) -> DataArguments:
        """The family's data: its training subset, resized and augmented as the regime says."""
        regime = self.regime_of(name)
        return DataArguments(max_train_samples=self.family(name).max_train_samples,
                             max_eval_samples=self.max_eval_samples, image_size=regime.image_size,
                             random_crop_padding=regime.random_crop_padding, horizontal_flip=regime.horizontal_flip)


ARGUMENTS = (ToSTBenchArguments, ModelArguments)


def _key(family: str, method: str, sparsity: float, technique: str | None = None, seed: int | None = None) -> str:
    return f"{family}/{method}@{sparsity:g}" + (f"/{technique}" if technique else "") + (
        "" if seed is None else f"/{seed}")


def recipe_repeats(args: ToSTBenchArguments) -> dict[str, list[str]]:
    """Per family, the variants whose runs would repeat others' while "full" runs too, so the grid leaves them out:
    "full" itself where the family's recipe is vanilla sparse training (the CNN recipe: its figures are the vanilla
    rows), else the variants that train exactly the recipe (their figures are the "full" rows)."""
    if "full" not in args.techniques:
        return {family: [] for family in args.families}
    repeats = {}
    for family in args.families:
        recipe = FAMILY_RECIPES[recipe_family(args.family(family))]
        if all(recipe[name] == value for name, value in VANILLA.items()):
            repeats[family] = ["full"]
            continue
        repeats[family] = [technique for technique in args.techniques if technique not in ("full", "vanilla")
                           and technique_arguments(technique, args.family(family)).items() <= recipe.items()]
    return repeats


def plan_grid(args: ToSTBenchArguments) -> list[tuple[str, str, float, str, int]]:
    """(family, method, sparsity, technique, seed) in run order: seed by seed, vanilla first in every cell, so a
    stopped grid still holds complete pairs."""
    repeats = recipe_repeats(args)
    grid = []
    for family in args.families:
        techniques = [t for t in args.techniques if t != "vanilla" and t not in repeats[family]]
        for position, seed in enumerate(args.seeds):
            for sparsity in args.sparsities:
                for method in args.methods:
                    for technique in ["vanilla", *techniques]:
                        if technique in ("vanilla", "full") or position < args.technique_seeds:
                            grid.append((family, method, sparsity, technique, seed))
    return grid


def _settings(args: ToSTBenchArguments, model_args: ModelArguments) -> dict[str, Any]:
    """What changes results: a JSON written with other values is not mixed with this run."""
    regime = {} if args.regime == "default" else {  # the default regime's JSONs keep their settings as they were
        "regime": {"name": args.regime, **{name: asdict(args.regime_of(name)) for name in args.families}}}
    diagnostic = {"gradient_flow_only": {"steps": args.gradient_flow_steps}} if args.gradient_flow_only else {}
    return {
        **regime,
        **diagnostic,
        "families": {name: asdict(args.family(name)) for name in args.families},
        "batch_size": args.batch_size, "max_eval_samples": args.max_eval_samples, "data_seed": args.data_seed,
        "mask_scope": args.mask_scope, "lottery_ticket_round_fraction": args.lottery_ticket_round_fraction,
        "model": {name: asdict(family_model(args.family(name), model_args)) for name in args.families},
        # only the recipes these families train with: a ResNet grid stays valid when the ViT recipe changes
        "recipes": {key: FAMILY_RECIPES[key] for key in sorted({recipe_family(args.family(name))
                                                                for name in args.families})},
    }


def merge_results(results: dict[str, Any], done: set[str], paths: list[str]) -> None:
    """Add to `results` the rows (and mask times) of other runs' JSONs with the same settings, skipping rows it
    already holds; `done` gains their keys."""
    for other_path in paths:
        other = load_resumable(other_path, results["settings"], fresh=False)
        if other is None:
            raise ValueError(f"`merge`: {other_path} is not a file.")
        for row in other["rows"]:
            key = _key(row["family"], row["method"], row["sparsity"], row["technique"], row["seed"])
            if key not in done:
                results["rows"].append(row)
                done.add(key)
        for key, seconds in other.get("mask_seconds", {}).items():
            results["mask_seconds"].setdefault(key, seconds)


def masks_folder(args: ToSTBenchArguments, model_args: ModelArguments) -> Path:
    """Where this run's masks are kept: named by a hash of the settings, so other settings never reuse them (a
    gradient-flow grid uses the masks of the full runs)."""
    settings = _settings(args, model_args)
    settings.pop("gradient_flow_only", None)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(args.output_dir) / "masks" / digest


def run_one(args, family: Family, data, model_args, cell: tuple, masks: Path) -> tuple[dict[str, Any], float | None]:
    """Train one variant; returns its row and, when it computed the mask, the mask's seconds."""
    family_name, method, sparsity, technique, seed = cell
    mask_file = masks / f"{family_name}_{method}_{sparsity:g}_seed{seed}.safetensors"
    run_dir = os.path.join(args.output_dir, "runs", f"{family_name}_{method}_{sparsity:g}_{technique}_seed{seed}")
    fields = training_fields(run_dir, family.epochs, args.batch_size, seed, learning_rate=family.learning_rate)
    fields.update(disable_tqdm=True, logging_steps=100, **family.training)
    training_args = ToSTTrainingArguments(
        **fields,
        mask_method=method,
        sparsity=sparsity,
        mask_scope=args.mask_scope,
        mask_path=str(mask_file) if mask_file.is_file() else None,
        lottery_ticket_round_fraction=args.lottery_ticket_round_fraction,
        **technique_arguments(technique, family),
    )
    model_args = family_model(family, model_args)
    model = build_model(model_args, data, seed)  # the same initial weights for every variant of a seed
    clock = TrainingClockCallback()
    flow = GradientFlowCallback(args.gradient_flow_steps, stop_after=args.gradient_flow_only)
    trainer = ToSTTrainer(model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
                          compute_metrics=compute_accuracy, callbacks=[clock, flow])
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
        "family": family_name,
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
        "masked_gradient_norm": flow.mean,
    }
    return row, (setup["mask_seconds"] if computed_mask else None)


def summarize(rows: list[dict[str, Any]], mask_seconds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One entry per (family, method, sparsity, technique): mean and standard deviation of the test accuracy over
    its seeds, mean training seconds, and against the vanilla runs of the same seeds the paired deltas
    (`accuracy_delta_points`: their mean, `delta_std`: their standard deviation), the time `overhead` and
    `gradient_flow_ratio` (the mean over seeds of the run's `masked_gradient_norm` over vanilla's, where recorded)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_key(row["family"], row["method"], row["sparsity"], row["technique"]), []).append(row)
    summary = []
    for runs in groups.values():
        first = runs[0]
        cell = (first["family"], first["method"], first["sparsity"])
        reference = {r["seed"]: r for r in groups.get(_key(*cell, "vanilla"), [])}
        paired = [(run, reference[run["seed"]]) for run in runs if run["seed"] in reference]
        deltas = [100 * (a["test_accuracy"] - b["test_accuracy"]) for a, b in paired]
        accuracies = [run["test_accuracy"] for run in runs]
        masks = [mask_seconds[k] for k in (_key(*cell, None, run["seed"]) for run in runs)
                 if mask_seconds and k in mask_seconds]
        flows = [a["masked_gradient_norm"] / b["masked_gradient_norm"] for a, b in paired
                 if a.get("masked_gradient_norm") and b.get("masked_gradient_norm")]
        summary.append({
            "family": first["family"],
            "method": first["method"],
            "sparsity": first["sparsity"],
            "technique": first["technique"],
            "seeds": sorted(run["seed"] for run in runs),
            "test_accuracy": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
            "train_seconds": statistics.mean(run["train_seconds"] for run in runs),
            "mask_seconds": statistics.mean(masks) if masks else None,
            "accuracy_delta_points": statistics.mean(deltas) if deltas else None,
            "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else None,
            "deltas": deltas,
            "overhead": sum(a["train_seconds"] for a, _ in paired) / sum(b["train_seconds"] for _, b in paired) - 1.0
            if paired else None,
            "gradient_flow_ratio": statistics.mean(flows) if flows else None,
        })
    return summary


def wins(summary: list[dict[str, Any]], family: str, technique: str = "full") -> tuple[int, int]:
    """(pairs where `technique` beats vanilla on the mean paired delta, pairs compared) for one family."""
    deltas = [row["accuracy_delta_points"] for row in summary
              if row["family"] == family and row["technique"] == technique and row["accuracy_delta_points"] is not None]
    return sum(delta > 0 for delta in deltas), len(deltas)


def format_table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'family':<10} {'method':<15} {'sparsity':>8} {'technique':<16} {'seeds':>5} {'test acc %':>13} "
             f"{'vs vanilla':>12} {'train s':>8} {'overhead':>9} {'mask s':>7} {'grad flow':>9}"]
    for row in summary:
        accuracy = f"{100 * row['test_accuracy']:.2f}"
        if row["test_accuracy_std"] is not None:
            accuracy += f"±{100 * row['test_accuracy_std']:.2f}"
        delta = "" if row["accuracy_delta_points"] is None else f"{row['accuracy_delta_points']:+.2f}"
        if row["delta_std"] is not None:
            delta += f"±{row['delta_std']:.2f}"
        overhead = "" if row["overhead"] is None else f"{100 * row['overhead']:+.1f}%"
        mask = "" if row["mask_seconds"] is None else f"{row['mask_seconds']:.1f}"
        flow = "" if row.get("gradient_flow_ratio") is None else f"{row['gradient_flow_ratio']:.2f}x"
        lines.append(
            f"{row['family']:<10} {row['method']:<15} {row['sparsity']:>8.2f} {row['technique']:<16} "
            f"{len(row['seeds']):>5} {accuracy:>13} {delta:>12} {row['train_seconds']:>8.1f} {overhead:>9} {mask:>7} "
            f"{flow:>9}"
        )
    return "\n".join(lines)


def main(args: ToSTBenchArguments, model_args: ModelArguments) -> list[dict[str, Any]]:
    os.makedirs(args.output_dir, exist_ok=True)
    path = Path(args.json or os.path.join(args.output_dir, "bench_tost.json"))
    results = load_resumable(path, _settings(args, model_args), args.fresh) or {
        "settings": _settings(args, model_args), "rows": [], "mask_seconds": {}}
    masks = masks_folder(args, model_args)
    if args.fresh:
        for stale in masks.glob("*.safetensors"):
            stale.unlink()  # a fresh run computes its masks again
    done = {_key(r["family"], r["method"], r["sparsity"], r["technique"], r["seed"]) for r in results["rows"]}
    if args.merge:
        merge_results(results, done, args.merge)
        results["table"] = summarize(results["rows"], results["mask_seconds"])
        write_json(path, results)
    grid = plan_grid(args)
    for family_name, same in recipe_repeats(args).items():
        if same == ["full"]:
            print(f"{family_name}: the family's recipe is vanilla sparse training; its figures are the vanilla rows.")
        elif same:
            print(f"{family_name}: {', '.join(same)} is the family's recipe itself; its figures are the 'full' rows.")
    selected = {_key(*cell) for cell in grid}
    data = {}
    for index, cell in enumerate(grid, start=1):
        key = _key(*cell)
        family_name, method, sparsity, technique, seed = cell
        prefix = f"[{index}/{len(grid)}] {family_name} {method} @ {sparsity:g}, {technique}, seed {seed}"
        if key in done:
            continue
        family = args.family(family_name)
        data_args = args.data_arguments(family_name)
        data_key = json.dumps(asdict(data_args), sort_keys=True)
        if data_key not in data:
            data[data_key] = prepare_data(data_args, seed=args.data_seed)
        print(f"\n=== {prefix} ===", flush=True)
        row, mask_seconds = run_one(args, family, data[data_key], model_args, cell, masks)
        results["rows"].append(row)
        if mask_seconds is not None:
            results["mask_seconds"][_key(family_name, method, sparsity, None, seed)] = mask_seconds
        results["table"] = summarize(results["rows"], results["mask_seconds"])
        write_json(path, results)
        done.add(key)
        print(f"{prefix}: test accuracy {100 * row['test_accuracy']:.2f} %, train {row['train_seconds']:.1f} s "
              f"({len(done & selected)}/{len(grid)} done)", flush=True)

    rows = [row for row in results["rows"]
            if _key(row["family"], row["method"], row["sparsity"], row["technique"], row["seed"]) in selected]
    order = {_key(*cell[:4]): position for position, cell in reversed(list(enumerate(grid)))}
    summary = sorted(summarize(rows, results["mask_seconds"]),
                     key=lambda row: order[_key(row["family"], row["method"], row["sparsity"], row["technique"])])
    for family_name in args.families:
        family = args.family(family_name)
        won, compared = wins(summary, family_name)
        regime = "" if args.regime == "default" else f", regime {args.regime}"
        verdict = f"; the full recipe wins {won} of {compared} pairs" if compared else ""
        print(f"\n{family_name}: Fashion-MNIST ({family.max_train_samples or 'all'} training images{regime}), "
              f"{family.epochs:g} epochs, {args.mask_scope} masks; accuracy mean±std over seeds, 'vs vanilla' the "
              f"mean±std of the paired deltas in points{verdict}:")
        family_rows = [row for row in summary if row["family"] == family_name]
        print(format_table(family_rows))
        if args.gradient_flow_only:
            print(f"(a gradient-flow grid: the accuracies are after {args.gradient_flow_steps} steps; the last column "
                  "is what it measures)")
            continue
        if not any(row["technique"] != "vanilla" and row["deltas"] for row in family_rows):
            continue  # vanilla only (e.g. a dense reference): no deltas to plot
        plot = Path(args.output_dir) / f"paired_deltas_{family_name}.png"
        try:  # a side artefact: the results are already written
            plot_paired_deltas(family_rows, str(plot),
                               f"{family_name}: change against vanilla sparse training (dots: seeds, bars: mean)"
                               + (f"; the recipe wins {won} of {compared} pairs" if compared else ""))
            print(f"Plot: {plot}")
        except Exception as error:  # noqa: BLE001
            print(f"warning: the plot {plot} was not written ({type(error).__name__}: {error})")
    print(f"\nResults: {path}")
    return summary
