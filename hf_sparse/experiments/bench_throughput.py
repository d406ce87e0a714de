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
) -> dict:
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
    for round_index in tqdm(range(warmup + rounds), desc="throughput rounds"):
        for name, model in models.items():
            model.train()
            step = time_training_step(model, optimizers[name], pixel_values, labels, dtype)
            model.eval()
            infer = time_inference(model, pixel_values, dtype)
            if round_index >= warmup:
                train_times[name].append(step)
                infer_times[name].append(infer)

    sparse_config = models["sparse_vit_off"].config
    base_train = batch_size / statistics.median(train_times["hf_vit"])
    base_infer = batch_size / statistics.median(infer_times["hf_vit"])
    dense_train_flops = training_flops(sparse_config)
    dense_forward_flops = forward_flops(sparse_config)
    rows = []
    for variant in VARIANTS:
        token, attention = variant.token_keep_ratio or 1.0, variant.attention_keep_ratio
        train_ips = batch_size / statistics.median(train_times[variant.name])
        infer_ips = batch_size / statistics.median(infer_times[variant.name])
        rows.append(
            {
                "variant": variant.name,
                "train_images_per_s": train_ips,
                "train_ratio": train_ips / base_train,
                "train_flops_ratio": dense_train_flops / training_flops(sparse_config, token, attention),
                "inference_images_per_s": infer_ips,
                "inference_ratio": infer_ips / base_infer,
                "inference_flops_ratio": dense_forward_flops / forward_flops(sparse_config, token, attention),
            }
        )
    return {
        "device": str(device_) if device_.type != "cuda" else torch.cuda.get_device_name(device_),
        "torch_threads": torch.get_num_threads(),
        "geometry": {"image_size": image_size, "patch_size": patch_size, "tokens": sparse_config.num_patches + 1},
        "batch_size": batch_size,
        "rounds": rounds,
        "attn_implementation": attn_implementation,
        "autocast": autocast_dtype or "none",
        "rows": rows,
        "variants": [asdict(v) for v in VARIANTS],
    }


def format_table(result: dict) -> str:
    lines = [
        f"device={result['device']} threads={result['torch_threads']} tokens={result['geometry']['tokens']} "
        f"batch={result['batch_size']} rounds={result['rounds']} attention={result['attn_implementation']} "
        f"autocast={result['autocast']}",
        f"{'variant':<20} {'train img/s':>11} {'x HF ViT':>9} {'FLOPs x':>8} {'infer img/s':>12} {'x HF ViT':>9} {'FLOPs x':>8}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['variant']:<20} {row['train_images_per_s']:>11.1f} {row['train_ratio']:>9.3f} "
            f"{row['train_flops_ratio']:>8.3f} {row['inference_images_per_s']:>12.1f} {row['inference_ratio']:>9.3f} "
            f"{row['inference_flops_ratio']:>8.3f}"
        )
    lines.append("(ratios: median images/s over HF ViT's; FLOPs x: the ideal speed-up from arithmetic alone, counting")
    lines.append(" masked attention connections as skipped, which fused SDPA with a boolean mask does not do)")
    return "\n".join(lines)


@dataclass
class ThroughputArguments:
    image_size: int = field(default=28, metadata={"help": "Input size (28 with patch 2: DeiT's 197 tokens)."})
    patch_size: int = field(default=2, metadata={"help": "Patch size."})
    num_channels: int = field(default=1, metadata={"help": "Input channels."})
    batch_size: int = field(default=32, metadata={"help": "Images per step."})
    rounds: int = field(default=5, metadata={"help": "Measured rounds (each times every variant once)."})
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
    )
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return result
