"""`hf-sparse bench gpu`: SparseViT where users train, on an accelerator: bf16 autocast, eager and `torch.compile`.

HF ViT (transformers' `ViTForImageClassification`, randomly initialised: nothing is downloaded) against SparseViT
converted from it at token keep 0.7 and 0.5 and at token 0.7 with attention keep 0.5 (FlexAttention on CUDA, SDPA
elsewhere), at DeiT-S and ViT-B geometry (224 px, patch 16, batch 128). Per geometry and mode, the variants run
interleaved round by round (as `bench throughput`): training images/s (median over rounds), the median over rounds
of each variant's speed-up over HF ViT measured in the same round, and peak memory (CUDA only). Two checks follow
the same settings: the kept-token sets under bf16 autocast against float32, and the host syncs a `TriLevelTrainer`
step makes between forward and backward. Neither fails the benchmark; both are reported.

Without CUDA the same code runs a tiny geometry in seconds (so CI covers it); the JSON names the device and
geometry that ran. `--max_seconds` bounds the run: blocks not started in time are listed as skipped. The JSON is
rewritten after every block, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import collections
import gc
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.overrides import TorchFunctionMode
from transformers import ViTConfig, ViTForImageClassification

from ..models.sparse_vit import SparseViTConfig, SparseViTForImageClassification
from ..validation import check_choice, check_int
from .bench_throughput import Variant, per_round_ratios, relative_spread, time_training_step
from .common import write_json


@dataclass(frozen=True)
class Geometry:
    """A ViT's width, depth and input: `intermediate_size` is 4 x hidden, as in DeiT and ViT."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 224
    patch_size: int = 16
    num_labels: int = 1000

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def fields(self) -> dict[str, int]:
        return dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_hidden_layers,
                    num_attention_heads=self.num_attention_heads, intermediate_size=4 * self.hidden_size,
                    image_size=self.image_size, patch_size=self.patch_size, num_channels=3,
                    num_labels=self.num_labels)


GEOMETRIES = {
    "deit_small": Geometry(hidden_size=384, num_hidden_layers=12, num_attention_heads=6),
    "vit_base": Geometry(hidden_size=768, num_hidden_layers=12, num_attention_heads=12),
    "tiny": Geometry(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
                     num_labels=10),
}
VARIANTS = {
    variant.name: variant
    for variant in (Variant("hf_vit", None), Variant("token_0.7", 0.7), Variant("token_0.5", 0.5),
                    Variant("token_0.7_attn_0.5", 0.7, 0.5))
}
MODES = ("eager", "compiled")
# Tensor methods that copy device memory to the host (explicitly, or through Python's int/float/bool/index).
HOST_COPY_METHODS = {"item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}


@dataclass
class GpuBenchArguments:
    output: str = field(default="outputs/bench_gpu.json", metadata={"help": "The one JSON written."})
    geometries: list[str] | None = field(
        default=None, metadata={"help": f"Of {sorted(GEOMETRIES)} (default: deit_small vit_base on CUDA, tiny "
                                "elsewhere)."})
    modes: list[str] = field(default_factory=lambda: list(MODES), metadata={"help": f"Of {MODES}."})
    variants: list[str] = field(default_factory=lambda: list(VARIANTS),
                                metadata={"help": f"Of {list(VARIANTS)}; hf_vit (the reference) is required."})
    batch_size: int | None = field(default=None, metadata={"help": "Images per step (default: 128 on CUDA, 8 "
                                                                   "elsewhere)."})
    rounds: int = field(default=10, metadata={"help": "Measured rounds (each times every variant once)."})
    warmup: int = field(default=3, metadata={"help": "Unmeasured steps per model first (compiles happen here)."})
    compile_backend: str | None = field(default=None, metadata={"help": "torch.compile backend (default: inductor "
                                                                        "on CUDA, aot_eager elsewhere)."})
    max_seconds: float = field(default=420.0, metadata={"help": "Start nothing new after this many seconds."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    kept_set_check: bool = field(default=True, metadata={"help": "Compare bf16 and float32 kept-token sets."})
    sync_check: bool = field(default=True, metadata={"help": "Count host syncs in TriLevelTrainer steps."})

    def __post_init__(self):
        for name in self.geometries or ():
            check_choice("geometries", name, tuple(GEOMETRIES))
        for name in self.modes:
            check_choice("modes", name, MODES)
        for name in self.variants:
            check_choice("variants", name, tuple(VARIANTS))
        if "hf_vit" not in self.variants:
            raise ValueError(f"`variants`={self.variants} must include 'hf_vit': ratios are against it.")
        for name in ("rounds", "warmup"):
            check_int(name, getattr(self, name), minimum=1)
        if self.batch_size is not None:
            check_int("batch_size", self.batch_size, minimum=1)
        if self.device is not None:
            check_choice("device", self.device, ("cuda", "cpu"))
            if self.device == "cuda" and not torch.cuda.is_available():
                raise ValueError("`device`='cuda' but torch sees no CUDA device here.")


ARGUMENTS = (GpuBenchArguments,)


# --- models ---------------------------------------------------------------------------------------------------------


def attention_implementation(variant: Variant, device: torch.device) -> str:
    """Attention sparsity on FlexAttention where its fused kernel exists (CUDA); SDPA otherwise and without a mask."""
    return "flex_attention" if variant.attention_keep_ratio < 1.0 and device.type == "cuda" else "sdpa"


def build_models(geometry: Geometry, variants: list[Variant], device: torch.device) -> dict[str, torch.nn.Module]:
    """HF ViT from a seeded random init, and each SparseViT variant converted from it (the same weights)."""
    torch.manual_seed(0)
    vit = ViTForImageClassification(ViTConfig(**geometry.fields(), layer_norm_eps=1e-6))
    vit.set_attn_implementation("sdpa")
    models: dict[str, torch.nn.Module] = {}
    for variant in variants:
        if variant.token_keep_ratio is None:
            model = vit
        else:
            model = SparseViTForImageClassification.from_vit(
                vit, token_keep_ratio=variant.token_keep_ratio, attention_keep_ratio=variant.attention_keep_ratio,
                attn_implementation=attention_implementation(variant, device))
        model.config.problem_type = "single_label_classification"  # set before the first forward: no recompile
        models[variant.name] = model.to(device).train()
    return models


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters and optimizer state: what the model holds between steps."""
    state = [value for entry in optimizer.state.values() for value in entry.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in [*model.parameters(), *state])


def measured_step(model, optimizer, pixel_values, labels) -> tuple[float, int | None]:
    """One bf16 training step: its seconds, and on CUDA the peak bytes it needed on top of what was allocated
    before it (activations, gradients, temporaries)."""
    cuda = pixel_values.device.type == "cuda"
    if cuda:
        before = torch.cuda.memory_allocated(pixel_values.device)
        torch.cuda.reset_peak_memory_stats(pixel_values.device)
    seconds = time_training_step(model, optimizer, pixel_values, labels, torch.bfloat16)
    if not cuda:
        return seconds, None
    return seconds, torch.cuda.max_memory_allocated(pixel_values.device) - before


# --- the timed blocks -------------------------------------------------------------------------------------------


def run_block(name: str, mode: str, variants: list[Variant], device: torch.device, batch_size: int,
              rounds: int, warmup: int, compile_backend: str, deadline: float) -> dict[str, Any]:
    """One geometry in one mode: warm every variant up (compiling it in compiled mode), then time them round by round.
    A variant whose warm-up would start after `deadline` is skipped, and rounds stop there too."""
    geometry = GEOMETRIES[name]
    models = build_models(geometry, variants, device)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, geometry.image_size, geometry.image_size, generator=generator)
    labels = torch.randint(0, geometry.num_labels, (batch_size,), generator=generator)
    pixel_values, labels = pixel_values.to(device), labels.to(device)
    ready: dict[str, tuple[Any, torch.optim.Optimizer]] = {}
    warmup_seconds: dict[str, float] = {}
    skipped: list[str] = []
    for variant_name, model in models.items():
        if time.perf_counter() > deadline:
            skipped.append(variant_name)
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        runner = torch.compile(model, backend=compile_backend) if mode == "compiled" else model
        start = time.perf_counter()
        for _ in range(warmup):
            time_training_step(runner, optimizer, pixel_values, labels, torch.bfloat16)
        warmup_seconds[variant_name] = time.perf_counter() - start
        ready[variant_name] = (runner, optimizer)
    times: dict[str, list[float]] = {variant_name: [] for variant_name in ready}
    step_peaks: dict[str, list[int]] = {variant_name: [] for variant_name in ready}
    # At least one round once HF ViT is warm (ratios need it), then rounds until `rounds` or the deadline.
    while "hf_vit" in ready and len(times["hf_vit"]) < rounds and (
            not times["hf_vit"] or time.perf_counter() < deadline):
        for variant_name, (runner, optimizer) in ready.items():
            seconds, peak = measured_step(runner, optimizer, pixel_values, labels)
            times[variant_name].append(seconds)
            if peak is not None:
                step_peaks[variant_name].append(peak)
    rows = []
    for variant in variants:
        if variant.name not in times or not times[variant.name]:
            continue
        model, optimizer = models[variant.name], ready[variant.name][1]
        ratios = per_round_ratios(times, variant.name)
        peak = max(step_peaks[variant.name]) + resident_bytes(model, optimizer) if step_peaks[variant.name] else None
        rows.append({
            "variant": variant.name,
            "token_keep_ratio": variant.token_keep_ratio or 1.0,
            "attention_keep_ratio": variant.attention_keep_ratio,
            "attn_implementation": model.config._attn_implementation,
            "train_images_per_s": batch_size / statistics.median(times[variant.name]),
            "train_seconds_per_round": times[variant.name],
            "train_ratio": statistics.median(ratios),
            "train_ratio_spread": relative_spread(ratios),
            "train_ratios_per_round": ratios,
            "peak_memory_bytes": peak,
            "warmup_seconds": warmup_seconds[variant.name],
        })
    reference = next((row for row in rows if row["variant"] == "hf_vit"), None)
    for row in rows:
        have_memory = reference is not None and row["peak_memory_bytes"] and reference["peak_memory_bytes"]
        row["peak_memory_ratio"] = row["peak_memory_bytes"] / reference["peak_memory_bytes"] if have_memory else None
    del models, ready
    _release_memory(device, compiled=mode == "compiled")
    return {"geometry": name, "mode": mode, "rounds": len(times.get("hf_vit", [])),
            "rows": rows, "skipped_variants": skipped}


def _release_memory(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch.compiler.reset()  # the next block's models are new: drop this block's graphs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- the checks ---------------------------------------------------------------------------------------------------


def sparse_vit_config(geometry: Geometry, **ratios: float) -> SparseViTConfig:
    return SparseViTConfig(**geometry.fields(), layer_norm_eps=1e-6, **ratios)


@torch.no_grad()
def kept_set_check(geometry: Geometry, device: torch.device, batch_size: int, token_keep_ratio: float = 0.7) -> dict:
    """Per pruning layer, the fraction of kept patch tokens under bf16 autocast that float32 also keeps (and of the
    images whose kept set is identical). From the second pruning layer on the inputs differ by bf16 rounding."""
    torch.manual_seed(0)
    model = SparseViTForImageClassification(sparse_vit_config(geometry, token_keep_ratio=token_keep_ratio))
    model.to(device).eval()
    pixel_values = torch.randn(batch_size, 3, geometry.image_size, geometry.image_size,
                               generator=torch.Generator().manual_seed(1)).to(device)
    reference = model(pixel_values).kept_patch_indices
    with torch.autocast(device.type, dtype=torch.bfloat16):
        half = model(pixel_values).kept_patch_indices
    overlap, identical = [], []
    for kept_float32, kept_bf16 in zip(reference, half):
        shared = (kept_bf16.unsqueeze(-1) == kept_float32.unsqueeze(-2)).any(-1)  # (batch, kept)
        overlap.append(shared.float().mean().item())
        identical.append(shared.all(dim=1).float().mean().item())
    return {"token_keep_ratio": token_keep_ratio, "images": batch_size, "initialisation": "random (seed 0)",
            "pruning_layers": list(model.config.token_pruning_layers),
            "kept_overlap_per_pruning_layer": overlap, "identical_sets_per_pruning_layer": identical}


class HostCopyCounter(TorchFunctionMode):
    """Counts, while `open`, the tensor methods that copy to the host: on an accelerator each one waits for the
    device. A `.to()` counts when it moves a tensor off an accelerator to the CPU; with `explicit_host_targets`, also
    when it names the host as a string (`.to("cpu")`, `.to(device="cpu")`) for a tensor on the CPU already: on a
    CPU-only machine that shows the copies an accelerator would make. (There a `torch.device("cpu")` target cannot be
    told from `.to(tensor.device)`: it is judged on an accelerator only.)

    `watch_training_steps(trainer)` opens the window at each training forward of the trainer's model and closes it
    when that step's backward begins, counting the windows; the tests of `TriLevelTrainer` and `sync_check` use it.
    """

    def __init__(self, explicit_host_targets: bool = False, cuda_sync_debug: bool = False) -> None:
        super().__init__()
        self.explicit_host_targets = explicit_host_targets
        self.cuda_sync_debug = cuda_sync_debug  # also have CUDA warn about every synchronising op in the window
        self.open = False
        self.windows = 0
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.open:
            name = getattr(func, "__name__", "")
            if name in HOST_COPY_METHODS or (name == "to" and self._moves_to_host(args, kwargs)):
                self.calls[f".{name}()"] += 1
        return func(*args, **kwargs)

    def _moves_to_host(self, args: tuple, kwargs: dict) -> bool:
        source = args[0] if args and torch.is_tensor(args[0]) else None
        if source is None:
            return False
        targets = [*args[1:], kwargs.get("device")]
        if source.device.type != "cpu":
            return any(isinstance(target, (str, torch.device)) and _is_host(target) for target in targets)
        return self.explicit_host_targets and any(isinstance(target, str) and _is_host(target) for target in targets)

    def open_window(self) -> None:
        self.open, self.windows = True, self.windows + 1
        if self.cuda_sync_debug:
            torch.cuda.set_sync_debug_mode("warn")

    def close_window(self) -> None:
        if self.cuda_sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        self.open = False

    def watch_training_steps(self, trainer: transformers.Trainer) -> None:
        """Open the window at each training forward of `trainer.model`, close it when the loss's backward begins."""
        backward = trainer.accelerator.backward

        def open_on_training_forward(module: torch.nn.Module, inputs: tuple) -> None:
            if module.training:
                self.open_window()

        def close_then_backward(loss: torch.Tensor, **kwargs) -> None:
            self.close_window()
            return backward(loss, **kwargs)

        trainer.model.register_forward_pre_hook(open_on_training_forward)
        trainer.accelerator.backward = close_then_backward


def _is_host(target: str | torch.device) -> bool:
    try:
        return torch.device(target).type == "cpu"
    except (RuntimeError, TypeError):
        return False


def sync_check(device: torch.device, steps_per_epoch: int = 3, epochs: int = 2) -> dict:
    """A short `TriLevelTrainer` run (forgetting example pruning, token and attention keep 0.5, bf16 on CUDA) on a
    tiny SparseViT: host copies between each training forward and its backward, and on CUDA the synchronising
    operations `torch.cuda.set_sync_debug_mode("warn")` reports in that window."""
    from ..tri_level import TriLevelTrainer, TriLevelTrainingArguments

    geometry, batch = GEOMETRIES["tiny"], 16
    torch.manual_seed(0)
    model = SparseViTForImageClassification(sparse_vit_config(geometry))
    active = steps_per_epoch * batch
    examples = [{"pixel_values": torch.randn(3, geometry.image_size, geometry.image_size), "labels": index % 10}
                for index in range(active * 4 // 3)]  # a quarter inactive: `active` examples trained per epoch
    on_cuda = device.type == "cuda"
    # Without an accelerator, `.to("cpu")` copies nothing, but would on one: count it (see `HostCopyCounter`).
    counter, sync_warnings = HostCopyCounter(explicit_host_targets=not on_cuda, cuda_sync_debug=on_cuda), []
    with tempfile.TemporaryDirectory() as output_dir:
        args = TriLevelTrainingArguments(
            output_dir=output_dir, num_train_epochs=epochs, per_device_train_batch_size=batch, learning_rate=1e-4,
            save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, seed=0,
            use_cpu=not on_cuda, bf16=on_cuda, dataloader_num_workers=0,
            example_pruning="forgetting", example_inactive_fraction=0.25, example_swap_fraction=0.125,
            token_keep_ratio=0.5, attention_keep_ratio=0.5, sparsity_warmup_fraction=0.0,
            sparsity_decay_fraction=0.0,
        )
        trainer = TriLevelTrainer(model=model, args=args, train_dataset=examples)
        counter.watch_training_steps(trainer)
        with warnings.catch_warnings(record=True) as caught, counter:
            warnings.simplefilter("always")
            try:
                trainer.train()
            finally:
                if on_cuda:
                    torch.cuda.set_sync_debug_mode(0)
        sync_warnings = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    return {
        "trainer": "TriLevelTrainer", "example_pruning": "forgetting", "forward_backward_windows": counter.windows,
        "host_copies_between_forward_and_backward": sum(counter.calls.values()),
        "host_copy_calls": dict(counter.calls),
        "cuda_syncs_between_forward_and_backward": len(sync_warnings) if on_cuda else None,
        "cuda_sync_examples": sorted(set(sync_warnings))[:5],
    }


def _guarded(check, *args, **kwargs) -> dict:
    """A check reports; it never fails the benchmark."""
    start = time.perf_counter()
    try:
        result = {"ran": True, **check(*args, **kwargs)}
    except Exception as error:  # noqa: BLE001 - reported in the JSON instead
        result = {"ran": False, "error": f"{type(error).__name__}: {error}"}
    result["seconds"] = time.perf_counter() - start
    return result


# --- the command ------------------------------------------------------------------------------------------------


def run_gpu_bench(args: GpuBenchArguments) -> dict:
    start = time.perf_counter()
    deadline = start + args.max_seconds
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    geometry_names = args.geometries or (["deit_small", "vit_base"] if cuda else ["tiny"])
    batch_size = args.batch_size or (128 if cuda else 8)
    backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
    variants = [VARIANTS[name] for name in VARIANTS if name in args.variants]
    result: dict[str, Any] = {
        "benchmark": "bench_gpu",
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_type": device.type,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "settings": {**asdict(args), "geometries": geometry_names, "batch_size": batch_size,
                     "compile_backend": backend, "autocast": "bf16", "optimizer": "AdamW"},
        "geometries": {name: {**asdict(GEOMETRIES[name]), "tokens": GEOMETRIES[name].tokens}
                       for name in geometry_names},
        "notes": [
            "train_ratio: median over rounds of HF ViT's step time over the variant's, measured in the same round "
            "and mode; train_images_per_s: batch over the median step time.",
            "peak_memory_bytes (CUDA only): the model's parameters and AdamW state plus the largest step peak "
            "above what was allocated before the step (torch.cuda.max_memory_allocated).",
        ],
        "blocks": [],
        "skipped": [],
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if args.kept_set_check:
        result["kept_set_check"] = _guarded(kept_set_check, GEOMETRIES[geometry_names[0]], device,
                                            min(batch_size, 32))
    if args.sync_check:
        result["sync_check"] = _guarded(sync_check, device)
    write_json(output, result)
    for mode in (mode for mode in MODES if mode in args.modes):
        for name in geometry_names:
            if time.perf_counter() > deadline:
                result["skipped"].append(f"{name}/{mode}: not started within max_seconds={args.max_seconds}")
                continue
            block = run_block(name, mode, variants, device, batch_size, args.rounds, args.warmup,
                              backend, deadline)
            result["blocks"].append(block)
            result["elapsed_seconds"] = time.perf_counter() - start
            write_json(output, result)
    result["elapsed_seconds"] = time.perf_counter() - start
    write_json(output, result)
    return result


def format_table(result: dict) -> str:
    lines = [f"device={result['device']} batch={result['settings']['batch_size']} autocast=bf16 "
             f"compile_backend={result['settings']['compile_backend']} elapsed={result['elapsed_seconds']:.0f}s",
             f"{'geometry':<11} {'mode':<9} {'variant':<19} {'attention':<15} {'img/s':>9} {'x HF ViT':>9} "
             f"{'spread':>7} {'peak MiB':>9} {'x HF ViT':>9}"]
    for block in result["blocks"]:
        for row in block["rows"]:
            memory = "-" if row["peak_memory_bytes"] is None else f"{row['peak_memory_bytes'] / 2**20:.0f}"
            memory_ratio = "-" if row["peak_memory_ratio"] is None else f"{row['peak_memory_ratio']:.3f}"
            lines.append(
                f"{block['geometry']:<11} {block['mode']:<9} {row['variant']:<19} {row['attn_implementation']:<15} "
                f"{row['train_images_per_s']:>9.1f} {row['train_ratio']:>9.3f} "
                f"{100 * row['train_ratio_spread']:>6.1f}% "
                f"{memory:>9} {memory_ratio:>9}")
    for line in result["skipped"]:
        lines.append(f"skipped: {line}")
    kept = result.get("kept_set_check")
    if kept and kept["ran"]:
        lines.append("bf16 kept-set overlap with float32 per pruning layer: "
                     + " / ".join(f"{value:.3f}" for value in kept["kept_overlap_per_pruning_layer"]))
    sync = result.get("sync_check")
    if sync and sync["ran"]:
        lines.append(f"TriLevelTrainer: {sync['host_copies_between_forward_and_backward']} host copies and "
                     f"{sync['cuda_syncs_between_forward_and_backward']} CUDA syncs between forward and backward "
                     f"over {sync['forward_backward_windows']} steps")
    return "\n".join(lines)


def main(args: GpuBenchArguments) -> dict:
    result = run_gpu_bench(args)
    print(format_table(result))
    print(f"JSON: {args.output}")
    return result
