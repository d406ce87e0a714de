"""`hf-sparse bench e2e`: does Tri-Level reach the accuracy dense training would, sooner? Measured the way a careful
reader trusts (`../shared/experiments.md`): for every seed, a dense ViT, then each Tri-Level variant followed by a
dense run budget-matched to that variant's measured wall-clock (its own cosine schedule fully decayed), all from the
seed's initial weights; time to dense accuracy read off each run's evaluations; medians and per-seed values.

Two regimes (`--regime`, a preset that fills what is not given on the command line):
  * short: full Fashion-MNIST, 2 epochs, the demo's ViT (hidden 96 x 6 layers, patch 4): far from converged;
  * converged: a 10,000-example subset, 30 epochs, the same ViT: dense gains under half a point over its last
    fifth, the regime of the papers' 300 epochs, reachable on 2 CPU cores;
  * converged_small: a 4,000-example subset, 15 epochs (a third of converged's steps): every arm of issue 18 over
    3 seeds in under two hours on two cores.

Token arms and the alternatives a user already has: `tokens_<r>` (CLS-attention top-k, the paper's selection),
`random_tokens_<r>` (a uniform random subset of the same size at the same layers: the control) and
`patch_dropout_<r>` (PatchDropout: random patches dropped once after the embedding, in training only, at a constant
share of patches whose training FLOPs match the whole `tokens_<r>` run's, its dense warm-up and cosine decay
included: 29 of 49 patches for `tokens_0.5`). Each arm that drops tokens
is also evaluated, once trained, pruned (CLS attention at `<r>`) and with all tokens: two more columns.

Runs are sequential and interleaved (dense, variant, its budget-matched dense, next variant ...) so a slow spell hits
every arm; results go to `<output_dir>/bench_e2e.json` after every seed, with `accuracy_vs_wall_clock.png` (the
Pareto picture: dense at several budgets, Tri-Level at several settings) beside it. Wall-clock excludes evaluation
and includes everything Tri-Level adds (statistics, refreshes, token scores). A rerun with the same settings keeps
the seeds already in the JSON and trains only the missing ones, so a stopped benchmark loses at most one seed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .common import DataArguments, ModelArguments, load_resumable, prepare_data, training_fields, with_defaults_from
from .common import write_json
from .plots import plot_pareto
from .runs import (
    TOLERANCE,
    RunResult,
    Variant,
    budget_matched_steps,
    median,
    spread,
    time_to_accuracy,
    train_dense,
    train_tri_level,
)

# the keep ratio reached over a tenth of training instead of the paper's third (100/300 epochs)
FAST_KEEP_RATIO_SCHEDULE = {"sparsity_decay_fraction": 0.1}

VARIANTS: dict[str, Variant] = {
    "tri_level": Variant("Tri-Level: forgetting 0.2 + tokens 0.7 + attention 0.5", "forgetting", 0.7, 0.5),
    "tri_level_no_attention": Variant("Tri-Level: forgetting 0.2 + tokens 0.7", "forgetting", 0.7),
    "tokens_0.7": Variant("tokens 0.7", "none", 0.7),
    "tokens_0.5": Variant("tokens 0.5", "none", 0.5),
    "random_tokens_0.7": Variant("tokens 0.7, random selection (control)", "none", 0.7, token_selection="random"),
    "random_tokens_0.5": Variant("tokens 0.5, random selection (control)", "none", 0.5, token_selection="random"),
    "patch_dropout_0.7": Variant("PatchDropout, FLOPs of the tokens 0.7 run", "none", patch_dropout_matched_to=0.7),
    "patch_dropout_0.5": Variant("PatchDropout, FLOPs of the tokens 0.5 run", "none", patch_dropout_matched_to=0.5),
    "tokens_0.7_fusion": Variant("tokens 0.7, fused (EViT)", "none", 0.7, token_fusion=True),
    "tokens_0.5_fusion": Variant("tokens 0.5, fused (EViT)", "none", 0.5, token_fusion=True),
    "attention_0.5": Variant("attention 0.5", "none", 1.0, 0.5),
    "data_forgetting": Variant("data: forgetting 0.2", "forgetting"),
    "data_random": Variant("data: random subsets 0.2 (control)", "random"),
    # `infobatch` is InfoBatch itself (its code's algorithm); `infobatch_fixed_size` is ours, "InfoBatch-like" (the
    # `infobatch` rows of results measured before the faithful mode existed were this one).
    "data_infobatch": Variant("data: InfoBatch (prune 0.5, delta 0.875)", "infobatch"),
    "infobatch_tokens_0.7": Variant("InfoBatch (prune 0.5, delta 0.875) + tokens 0.7", "infobatch", 0.7),
    "infobatch_tokens_0.5": Variant("InfoBatch (prune 0.5, delta 0.875) + tokens 0.5", "infobatch", 0.5),
    # the combination with the keep ratio reached in a tenth of training instead of a third (the paper's 100/300):
    # fewer steps at high keep ratios, the place left to save time once both levels are on
    "infobatch_tokens_0.5_fast_schedule": Variant(
        "InfoBatch (prune 0.5, delta 0.875) + tokens 0.5, keep ratio reached over 1/10 of training", "infobatch", 0.5,
        arguments=FAST_KEEP_RATIO_SCHEDULE),
    "tokens_0.5_fast_schedule_steps_of_infobatch_tokens_0.5_fast_schedule": Variant(
        "tokens 0.5, keep ratio reached over 1/10, the steps of InfoBatch + tokens 0.5 on that schedule", "none", 0.5,
        arguments=FAST_KEEP_RATIO_SCHEDULE, steps_matched_to="infobatch_tokens_0.5_fast_schedule"),
    "data_infobatch_fixed_size": Variant("data: InfoBatch-like 0.3 (fixed epoch size)", "infobatch_fixed_size",
                                         inactive_fraction=0.3),
    "infobatch_fixed_size_tokens_0.7": Variant("InfoBatch-like 0.3 (fixed epoch size) + tokens 0.7",
                                               "infobatch_fixed_size", 0.7, inactive_fraction=0.3),
    "infobatch_fixed_size_tokens_0.5": Variant("InfoBatch-like 0.3 (fixed epoch size) + tokens 0.5",
                                               "infobatch_fixed_size", 0.5, inactive_fraction=0.3),
    "forgetting_tokens_0.5": Variant("Tri-Level: forgetting 0.2 + tokens 0.5", "forgetting", 0.5),
    # tokens alone for the steps the InfoBatch combination trains (the same wall-clock, tokens costing the same per
    # step): does the data level add anything to the token level, or would fewer epochs do as well?
    "tokens_0.5_steps_of_infobatch_tokens_0.5": Variant(
        "tokens 0.5, the steps of InfoBatch + tokens 0.5", "none", 0.5, steps_matched_to="infobatch_tokens_0.5"),
}
DEFAULT_VARIANTS = ("tri_level", "tokens_0.5", "infobatch_fixed_size_tokens_0.5")

REGIMES: dict[str, dict[str, Any]] = {
    "short": dict(epochs=2.0, max_train_samples=None, model={}),
    "converged": dict(epochs=30.0, max_train_samples=10_000, model={}),
    # A third of the converged regime's steps, so that a dozen arms x 3 seeds fit an afternoon on two cores.
    "converged_small": dict(epochs=15.0, max_train_samples=4_000, model={}),
}


@dataclass
class E2EArguments:
    output_dir: str = field(default="outputs/bench_e2e", metadata={"help": "Where runs, table and plot go."})
    regime: str = field(default="short", metadata={"help": "Preset of epochs and training images: " + "; ".join(
        f"{name}: {preset['epochs']:g} epochs on {preset['max_train_samples'] or 'all 60000'} images"
        for name, preset in REGIMES.items()) + " (--epochs and --max_train_samples override it).",
        "choices": list(REGIMES)})
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS),
                                metadata={"help": "Tri-Level variants (the dense run is always first).",
                                          "choices": list(VARIANTS)})
    seeds: list[int] = field(default_factory=lambda: [42, 43, 44], metadata={"help": "Seeds (initial weights, "
                             "data order); every arm of a seed starts from the same weights."})
    budget_matched: bool = field(default=True, metadata={"help": "Train a budget-matched dense run per variant."})
    epochs: float | None = field(default=None, metadata={"help": "Training epochs (default: the regime's)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Training subset (default: the regime's; 0: the whole training set)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first examples only."})
    batch_size: int = field(default=128, metadata={"help": "Training batch size."})
    evaluations: int = field(default=6, metadata={"help": "Test-set evaluations per run (curves, time to accuracy)."})
    data_seed: int = field(default=42, metadata={"help": "Picks the training subset."})
    json: str | None = field(default=None, metadata={"help": "Results file (default <output_dir>/bench_e2e.json); "
                                                       "resumed: seeds already there are kept."})
    fresh: bool = field(default=False, metadata={"help": "Ignore (overwrite) seeds already in the JSON."})

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct integers, got {self.seeds}.")
        for position, key in enumerate(self.variants):
            reference = VARIANTS[key].steps_matched_to
            if reference is not None and reference not in self.variants[:position]:
                raise ValueError(f"`variants`: {key!r} trains the steps of {reference!r}; "
                                 f"list {reference!r} before it.")
        preset = REGIMES[self.regime]
        self.epochs = preset["epochs"] if self.epochs is None else self.epochs
        if self.max_train_samples is None:
            self.max_train_samples = preset["max_train_samples"]
        self.max_train_samples = self.max_train_samples or None


ARGUMENTS = (E2EArguments, ModelArguments)


def run_seed(args: E2EArguments, model_args: ModelArguments, data, seed: int,
             done: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every arm of one seed: {"dense": RunResult, variant: {"run": RunResult, "budget_matched": RunResult}}. Arms in
    `done` (read back from the JSON) are kept, not trained again: adding a variant costs only its own runs."""
    fields = training_fields(os.path.join(args.output_dir, f"seed{seed}"), args.epochs, args.batch_size, seed,
                             args.evaluations)
    fields.update(disable_tqdm=True, logging_steps=100)
    runs: dict[str, Any] = dict(done or {})
    if "dense" not in runs:
        runs["dense"] = train_dense(data, model_args, seed, fields, name="dense")[0]
    for key in args.variants:
        if key in runs:
            continue
        variant = VARIANTS[key]
        length = {} if variant.steps_matched_to is None else {"max_steps": runs[variant.steps_matched_to]["run"].steps}
        tri, _ = train_tri_level(data, model_args, seed, dict(fields, **length), variant, name=key)
        runs[key] = {"run": tri}
        # a steps-matched arm has its reference's budget, hence its budget-matched dense run (`summarize`)
        if args.budget_matched and variant.steps_matched_to is None:
            steps = budget_matched_steps(runs["dense"], tri.train_seconds)
            # only its final accuracy is read: one evaluation, at its end
            final_only = dict(fields, eval_strategy="no", eval_steps=None)
            runs[key]["budget_matched"] = train_dense(data, model_args, seed, final_only,
                                                      name=f"dense_matched_{key}", max_steps=steps,
                                                      role="dense_budget_matched")[0]
    return runs


def summarize(args: E2EArguments, per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant (dense first): medians and per-seed values of accuracy, wall-clock, images, time saved,
    the budget-matched dense accuracy, the deltas against both dense runs and the time to dense accuracy; for arms
    that drop tokens, the accuracy evaluated pruned and with all tokens (medians of the seeds that measured them)."""
    seeds = sorted(per_seed)
    dense = {seed: per_seed[seed]["dense"] for seed in seeds}
    target = {seed: dense[seed].accuracy - TOLERANCE for seed in seeds}
    rows = []
    for key in ["dense", *args.variants]:
        budget_of = key if key == "dense" else VARIANTS[key].steps_matched_to or key
        runs = {seed: dense[seed] if key == "dense" else per_seed[seed][key]["run"] for seed in seeds}
        matched = {seed: dense[seed] if key == "dense" else per_seed[seed][budget_of].get("budget_matched")
                   for seed in seeds}
        values = {
            "test_accuracy": [runs[s].accuracy for s in seeds],
            "train_seconds": [runs[s].train_seconds for s in seeds],
            "images_trained": [runs[s].images_trained for s in seeds],
            "optimizer_steps": [runs[s].steps for s in seeds],
            "time_saved": [1.0 - runs[s].train_seconds / dense[s].train_seconds for s in seeds],
            "delta_vs_dense_points": [100 * (runs[s].accuracy - dense[s].accuracy) for s in seeds],
            "time_to_dense_accuracy_s": [time_to_accuracy(runs[s].curve, target[s]) for s in seeds],
            "budget_matched_dense_accuracy": [matched[s].accuracy if matched[s] else None for s in seeds],
            "budget_matched_dense_seconds": [matched[s].train_seconds if matched[s] else None for s in seeds],
            "delta_vs_budget_matched_points": [
                100 * (runs[s].accuracy - matched[s].accuracy) if matched[s] else None for s in seeds],
        }
        # None here is "not measured" (no token level, or a seed from an older JSON), not "never": left out
        measured = {
            "pruned_accuracy": [runs[s].pruned_accuracy for s in seeds],
            "all_tokens_accuracy": [runs[s].all_tokens_accuracy for s in seeds],
        }
        row = {"variant": key, "label": "dense ViT" if key == "dense" else VARIANTS[key].label, "seeds": seeds}
        for name, per in measured.items():
            row[name] = median([value for value in per if value is not None])
            row[f"{name}_per_seed"] = per
            row[f"{name}_spread"] = spread(per)
        for name, per in values.items():
            row[name] = median(per)
            row[f"{name}_per_seed"] = per
            row[f"{name}_spread"] = spread(per)
        row["time_to_dense_accuracy_fraction"] = (
            None if row["time_to_dense_accuracy_s"] is None
            else row["time_to_dense_accuracy_s"] / median([dense[s].train_seconds for s in seeds]))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(row, name, scale=1.0, digits=2, sign=False):
        value, (low, high) = row[name], row[f"{name}_spread"]
        if value is None:
            return "never" if name.startswith("time_to") else "-"
        text = f"{scale * value:+.{digits}f}" if sign else f"{scale * value:.{digits}f}"
        return text + (f" [{scale * low:.{digits}f},{scale * high:.{digits}f}]" if low is not None and low != high else "")

    lines = [f"{'variant':<26} {'test acc %':>20} {'pruned %':>20} {'all tokens %':>20} {'train s':>18} "
             f"{'saved %':>7} {'vs dense':>20} {'matched dense %':>20} {'vs matched':>20} {'to dense acc s':>20}"]
    for row in rows:
        lines.append(
            f"{row['variant']:<26} {cell(row, 'test_accuracy', 100):>20} {cell(row, 'pruned_accuracy', 100):>20} "
            f"{cell(row, 'all_tokens_accuracy', 100):>20} {cell(row, 'train_seconds', 1, 1):>18} "
            f"{100 * row['time_saved']:>7.1f} {cell(row, 'delta_vs_dense_points', sign=True):>20} "
            f"{cell(row, 'budget_matched_dense_accuracy', 100):>20} "
            f"{cell(row, 'delta_vs_budget_matched_points', sign=True):>20} {cell(row, 'time_to_dense_accuracy_s', 1, 1):>20}"
        )
    lines.append("(medians over seeds, [min,max] across seeds; deltas in points, paired by seed; 'test acc': the model "
                 "as configured (PatchDropout: all tokens); 'pruned': CLS-attention selection at the arm's token keep "
                 "ratio; 'all tokens': keep ratio 1; 'to dense acc': "
                 f"wall-clock at which the run's evaluations first reach the dense run's final accuracy - "
                 f"{100 * TOLERANCE:.1f})")
    return "\n".join(lines)


def pareto_points(rows: list[dict[str, Any]], per_seed: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """Median (seconds, accuracy) of every run kind: dense at each budget, and every Tri-Level variant."""
    points = [{"kind": "dense", "label": "dense (full)", "seconds": rows[0]["train_seconds"],
               "accuracy": rows[0]["test_accuracy"]}]
    for row in rows[1:]:
        points.append({"kind": "tri_level", "label": row["variant"], "seconds": row["train_seconds"],
                       "accuracy": row["test_accuracy"]})
        if row["budget_matched_dense_accuracy"] is not None and VARIANTS[row["variant"]].steps_matched_to is None:
            points.append({"kind": "dense", "label": f"dense, budget of {row['variant']}",
                           "seconds": row["budget_matched_dense_seconds"],
                           "accuracy": row["budget_matched_dense_accuracy"]})
    return points


def main(args: E2EArguments, model_args: ModelArguments) -> list[dict[str, Any]]:
    model_args = with_defaults_from(model_args, REGIMES[args.regime]["model"])
    os.makedirs(args.output_dir, exist_ok=True)
    data = prepare_data(DataArguments(max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples),
                        seed=args.data_seed)
    path = args.json or os.path.join(args.output_dir, "bench_e2e.json")
    per_seed = finished_seeds(path, args, model_args)
    arms = ["dense", *args.variants]

    def has_every_arm(seed: int) -> bool:
        return all(arm in per_seed.get(seed, {}) for arm in arms)

    for seed in sorted(per_seed):
        print(f"Resuming {path}: seed {seed} has {[arm for arm in arms if arm in per_seed[seed]]} of {arms}.")
    for seed in args.seeds:
        if not has_every_arm(seed):
            per_seed[seed] = run_seed(args, model_args, data, seed, per_seed.get(seed))
        # the table: the asked seeds with every asked arm; the JSON keeps every run it holds
        complete = {s: per_seed[s] for s in args.seeds if has_every_arm(s)}
        rows = summarize(args, complete)
        dense_steps = [complete[s]["dense"].steps / complete[s]["dense"].train_seconds for s in complete]
        result = {
            "arguments": asdict(args), "model": asdict(model_args), "training_images": len(data.train),
            "calibration": {"dense_steps_per_second": median(dense_steps),
                            "dense_steps_per_second_per_seed": dense_steps, "batch_size": args.batch_size},
            "rows": rows, "pareto": pareto_points(rows, complete),
            "runs": {str(s): _runs_json(per_seed[s]) for s in per_seed},
        }
        write_json(path, result)
    title = (f"{data.name}, {args.regime} regime ({len(data.train)} images, {args.epochs:g} epochs), "
             f"median of {len(args.seeds)} seeds")
    plot_pareto(result["pareto"], os.path.join(args.output_dir, "accuracy_vs_wall_clock.png"), title)
    print(f"\n{title}; dense: {result['calibration']['dense_steps_per_second']:.2f} steps/s at batch "
          f"{args.batch_size}")
    print(format_table(rows))
    print(f"\nResults: {path}")
    return rows


def finished_seeds(path: str, args: E2EArguments, model_args: ModelArguments) -> dict[int, dict[str, Any]]:
    """The arms of each seed that a previous run with the same settings (all but the seed and variant lists) wrote,
    read back from its JSON; a JSON written with other settings is an error (`--fresh` overwrites it), never silently
    replaced. Arms of variants not asked for now stay in the JSON's runs."""
    ignored = ("seeds", "variants", "fresh", "output_dir", "json")  # what does not change a result
    settings = {"arguments": {k: v for k, v in asdict(args).items() if k not in ignored}, "model": asdict(model_args)}
    previous = load_resumable(path, settings, args.fresh, settings_of=lambda results: {
        "arguments": {k: v for k, v in results.get("arguments", {}).items() if k not in ignored},
        "model": results.get("model")})
    if previous is None:
        return {}

    def run(value: dict[str, Any] | None) -> RunResult | None:
        return None if value is None else RunResult(**value)

    return {int(seed): {key: run(value) if key == "dense" else {k: run(v) for k, v in value.items()}
                        for key, value in runs.items()}
            for seed, runs in previous.get("runs", {}).items()}


def _runs_json(runs: dict[str, Any]) -> dict[str, Any]:
    def one(run: RunResult | None):
        return None if run is None else dataclasses.asdict(run)

    return {key: one(value) if isinstance(value, RunResult) else {k: one(v) for k, v in value.items()}
            for key, value in runs.items()}
