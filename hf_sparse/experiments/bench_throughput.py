"""`hf-sparse bench throughput`: training-step and inference images/s of HF ViT vs SparseViT variants.

Variants run interleaved round by round (so drift on a shared machine hits all of them alike); we report medians
and the ratio of each median to HF ViT's, beside the theoretical FLOPs ratio.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import ViTConfig, ViTForImageClassification

from ..flops import forward_flops, training_flops
from ..models.sparse_vit import SparseViTForImageClassification


@dataclass
class Variant:
    name: str
    token_keep_ratio: float | None  # None: HF ViT itself
    attention_keep_ratio: float = 1.0


VARIANTS = [
    Variant("hf_vit", None),
    Variant("sparse_vit_off", 1.0),
    Variant("token_0.7", 0.7),
    Variant("token_0.7_attn_0.5", 0.7, 0.5),
]


def deit_tiny_geometry(image_size: int, patch_size: int, num_channels: int, num_labels: int) -> ViTConfig:
    """DeiT-Tiny's width and depth (192 x 12 layers, 3 heads, MLP 768) on the given image geometry."""
    return ViTConfig(
        hidden_size=192,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=768,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_labels=num_labels,
        layer_norm_eps=1e-6,
    )


def build_models(vit_config: ViTConfig, attn_implementation: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    vit = ViTForImageClassification(vit_config)
    vit.set_attn_implementation(attn_implementation)
    models: dict[str, torch.nn.Module] = {"hf_vit": vit}
    for variant in VARIANTS[1:]:
        models[variant.name] = SparseViTForImageClassification.from_vit(
            vit,
            token_keep_ratio=variant.token_keep_ratio,
            attention_keep_ratio=variant.attention_keep_ratio,
            attn_implementation=attn_implementation,
        )
    return models


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training_step(model, optimizer, pixel_values, labels, autocast_dtype) -> float:
    device = pixel_values.device
    _synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def time_inference(model, pixel_values, autocast_dtype) -> float:
    device = pixel_values.device
    _synchronize(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        model(pixel_values=pixel_values)
    _synchronize(device)
    return time.perf_counter() - start


def run_throughput(
    image_size: int = 28,
    patch_size: int = 2,
    num_channels: int = 1,
    batch_size: int = 32,
    rounds: int = 5,
    warmup: int = 1,
    attn_implementation: str = "sdpa",
    device: str | None = None,
    autocast_dtype: str | None = None,
    max_rounds: int | None = None,
    target_spread: float = 0.05,
) -> dict:
    """Round after round (every variant once per round, in turn), each variant's speed-up over HF ViT in that round;
    at least `rounds`, then more until every ratio's relative spread (interquartile range over median) is under
    `target_spread`, or `max_rounds` (default 4 x rounds)."""
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {None: None, "none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[autocast_dtype]
    vit_config = deit_tiny_geometry(image_size, patch_size, num_channels, num_labels=10)
    models = build_models(vit_config, attn_implementation)
    optimizers = {}
    for name, model in models.items():
        model.to(device_).train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, num_channels, image_size, image_size, generator=generator).to(device_)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device_)

    train_times: dict[str, list[float]] = {name: [] for name in models}
    infer_times: dict[str, list[float]] = {name: [] for name in models}
    max_rounds = max(rounds, max_rounds or 4 * rounds)
    progress = tqdm(desc="throughput rounds", total=warmup + rounds)
    round_index = 0
    while True:
        for name, model in models.items():
            model.train()
            step = time_training_step(model, optimizers[name], pixel_values, labels, dtype)
            model.eval()
            infer = time_inference(model, pixel_values, dtype)
            if round_index >= warmup:
                train_times[name].append(step)
                infer_times[name].append(infer)
        round_index += 1
        progress.update()
        measured = round_index - warmup
        if measured >= rounds:
            worst = max(relative_spread(per_round_ratios(times, name)) for times in (train_times, infer_times)
                        for name in models)
            if worst < target_spread or measured >= max_rounds:
                break
            progress.total += 1
    progress.close()

    sparse_config = models["sparse_vit_off"].config
    dense_train_flops = training_flops(sparse_config)
    dense_forward_flops = forward_flops(sparse_config)
    rows = []
    for variant in VARIANTS:
        token, attention = variant.token_keep_ratio or 1.0, variant.attention_keep_ratio
        train_ips = batch_size / statistics.median(train_times[variant.name])
        infer_ips = batch_size / statistics.median(infer_times[variant.name])
        train_ratios = per_round_ratios(train_times, variant.name)
        infer_ratios = per_round_ratios(infer_times, variant.name)
        rows.append(
            {
                "variant": variant.name,
                "train_images_per_s": train_ips,
                "train_ratio": statistics.median(train_ratios),
                "train_ratio_spread": relative_spread(train_ratios),
                "train_ratios_per_round": train_ratios,
                "train_flops_ratio": dense_train_flops / training_flops(sparse_config, token, attention),
                "inference_images_per_s": infer_ips,
                "inference_ratio": statistics.median(infer_ratios),
                "inference_ratio_spread": relative_spread(infer_ratios),
                "inference_ratios_per_round": infer_ratios,
                "inference_flops_ratio": dense_forward_flops / forward_flops(sparse_config, token, attention),
            }
        )
    return {
        "device": str(device_) if device_.type != "cuda" else torch.cuda.get_device_name(device_),
        "torch_threads": torch.get_num_threads(),
        "geometry": {"image_size": image_size, "patch_size": patch_size, "tokens": sparse_config.num_patches + 1},
        "batch_size": batch_size,
        "rounds": len(train_times["hf_vit"]),
        "target_spread": target_spread,
        "attn_implementation": attn_implementation,
        "autocast": autocast_dtype or "none",
        "rows": rows,
        "variants": [asdict(v) for v in VARIANTS],
    }


def per_round_ratios(times: dict[str, list[float]], name: str) -> list[float]:
    """Speed-up over HF ViT in each round (HF ViT's time over the variant's, measured side by side)."""
    return [reference / own for reference, own in zip(times["hf_vit"], times[name])]


def relative_spread(values: list[float]) -> float:
    """Interquartile range over the median (0 for fewer than 2 values)."""
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / statistics.median(values)


def format_table(result: dict) -> str:
    lines = [
        f"device={result['device']} threads={result['torch_threads']} tokens={result['geometry']['tokens']} "
        f"batch={result['batch_size']} rounds={result['rounds']} attention={result['attn_implementation']} "
        f"autocast={result['autocast']}",
        f"{'variant':<20} {'train img/s':>11} {'x HF ViT':>9} {'spread':>7} {'FLOPs x':>8} {'infer img/s':>12} "
        f"{'x HF ViT':>9} {'spread':>7} {'FLOPs x':>8}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['variant']:<20} {row['train_images_per_s']:>11.1f} {row['train_ratio']:>9.3f} "
            f"{100 * row['train_ratio_spread']:>6.1f}% {row['train_flops_ratio']:>8.3f} "
            f"{row['inference_images_per_s']:>12.1f} {row['inference_ratio']:>9.3f} "
            f"{100 * row['inference_ratio_spread']:>6.1f}% {row['inference_flops_ratio']:>8.3f}"
        )
    lines.append("(x HF ViT: median over rounds of the speed-up measured side by side in each round; spread: its")
    lines.append(" interquartile range over the median; FLOPs x: the ideal speed-up from arithmetic alone, counting")
    lines.append(" masked attention connections as skipped, which fused SDPA with a boolean mask does not do)")
    return "\n".join(lines)


@dataclass
class ThroughputArguments:
    image_size: int = field(default=28, metadata={"help": "Input size (28 with patch 2: DeiT's 197 tokens)."})
    patch_size: int = field(default=2, metadata={"help": "Patch size."})
    num_channels: int = field(default=1, metadata={"help": "Input channels."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    rounds: int = field(default=7, metadata={"help": "Measured rounds at least (each times every variant once)."})
    max_rounds: int | None = field(default=None, metadata={"help": "Rounds at most (default 4 x rounds)."})
    target_spread: float = field(default=0.05, metadata={"help": "Keep measuring until every ratio's spread "
                                 "(interquartile range over median) is under this."})
    warmup: int = field(default=1, metadata={"help": "Unmeasured rounds first."})
    attn_implementation: str = field(default="sdpa", metadata={"help": "Attention kernel.", "choices": ["sdpa", "eager"]})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (default: cuda when available)."})
    autocast: str = field(default="none", metadata={"help": "Mixed precision.", "choices": ["none", "bf16", "fp16"]})
    json: str | None = field(default=None, metadata={"help": "Also write the result as JSON here."})


ARGUMENTS = (ThroughputArguments,)


def main(args: ThroughputArguments) -> dict:
    result = run_throughput(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=args.num_channels,
        batch_size=args.batch_size,
        rounds=args.rounds,
        warmup=args.warmup,
        attn_implementation=args.attn_implementation,
        device=args.device,
        autocast_dtype=args.autocast,
        max_rounds=args.max_rounds,
        target_spread=args.target_spread,
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result
