"""Strict conversion of HF `ViTForImageClassification` / `DeiTForImageClassification` checkpoints to SparseViT.

Conversion reads the on-disk parameter names (transformers keeps the v4 names in saved checkpoints even where 5.x
renamed the modules in memory) and never imports ViT's internal classes. Every source key must map to exactly one
SparseViT key and every SparseViT key must be filled, with the same shape: anything else is an error.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file

from transformers import PreTrainedConfig

from .configuration_sparse_vit import SparseViTConfig


SUPPORTED_ARCHITECTURES = {"ViTForImageClassification": "vit", "DeiTForImageClassification": "deit"}

# Source-name patterns (v4 on-disk names, and the 5.x in-memory names for safety) -> SparseViT names.
_KEY_RULES: list[tuple[str, str]] = [
    (r"embeddings\.(cls_token|distillation_token|position_embeddings)", r"embeddings.\1"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.(weight|bias)", r"encoder.layers.\1.attention.q_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.(weight|bias)", r"encoder.layers.\1.attention.k_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.(weight|bias)", r"encoder.layers.\1.attention.v_proj.\2"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", r"encoder.layers.\1.attention.o_proj.\2"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc1.\2"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", r"encoder.layers.\1.mlp.fc2.\2"),
    (r"encoder\.layer\.(\d+)\.(layernorm_before|layernorm_after)\.(weight|bias)", r"encoder.layers.\1.\2.\3"),
    (r"layers\.(\d+)\.attention\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", r"encoder.layers.\1.attention.\2.\3"),
    (r"layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"layers\.(\d+)\.(layernorm_before|layernorm_after)\.(weight|bias)", r"encoder.layers.\1.\2.\3"),
    (r"layernorm\.(weight|bias)", r"layernorm.\1"),
]

_CONFIG_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "encoder_stride",
    "id2label",
    "label2id",
    "problem_type",
)


def convert_state_dict(state_dict: dict[str, torch.Tensor], source_prefix: str) -> dict[str, torch.Tensor]:
    """Rename a ViT/DeiT image-classification state dict to SparseViT's names; unknown keys are an error."""
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        if name.startswith("classifier."):
            converted[name] = tensor
            continue
        if not name.startswith(source_prefix + "."):
            unknown.append(name)
            continue
        inner = name[len(source_prefix) + 1 :]
        for pattern, replacement in _KEY_RULES:
            if re.fullmatch(pattern, inner):
                converted["sparse_vit." + re.sub(pattern, replacement, inner)] = tensor
                break
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"Cannot convert these source parameters to SparseViT (no rule maps them): {sorted(unknown)}")
    return converted


def _check_overrides(overrides: dict[str, Any]) -> None:
    """A misspelt override would otherwise be stored on the config and silently do nothing."""
    allowed = set(inspect.signature(SparseViTConfig.__init__).parameters) - {"self", "kwargs"}
    allowed |= set(inspect.signature(PreTrainedConfig.__init__).parameters) - {"self", "kwargs"}
    allowed |= {"attn_implementation", "num_labels"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(f"Unknown SparseViT config override(s) {unknown}; SparseViTConfig fields are "
                         f"{sorted(allowed)}.")


def sparse_vit_config_from_source(source_config: dict[str, Any], **overrides: Any) -> SparseViTConfig:
    """A SparseViTConfig with the source's architecture fields and labels, plus the given overrides."""
    _check_overrides(overrides)
    architectures = source_config.get("architectures") or []
    if "DeiTForImageClassificationWithTeacher" in architectures:
        raise ValueError(
            "DeiTForImageClassificationWithTeacher is not converted: its prediction averages two heads (CLS and "
            "distillation token), which SparseViT's single CLS classifier cannot reproduce. Convert a "
            "DeiTForImageClassification checkpoint instead (same backbone, CLS head)."
        )
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ValueError(
            f"Source architectures {architectures} are not supported; expected one of {sorted(SUPPORTED_ARCHITECTURES)}."
        )
    fields = {name: source_config[name] for name in _CONFIG_FIELDS if name in source_config}
    if "id2label" in fields:
        fields["id2label"] = {int(k): v for k, v in fields["id2label"].items()}
    fields["use_distillation_token"] = SUPPORTED_ARCHITECTURES[supported[0]] == "deit"
    attn_implementation = overrides.pop("attn_implementation", None)
    fields.update(overrides)
    config = SparseViTConfig(**fields)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def load_source_checkpoint(source: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config dict, on-disk state dict) of a model object, a local checkpoint directory or a Hub repo id (fetched
    like `from_pretrained` does: the cache, `HF_ENDPOINT`, offline mode and tokens apply)."""
    if isinstance(source, (str, os.PathLike)):
        folder = local_folder(str(source))
        if folder is None:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(str(source), allow_patterns=["config.json", "*.safetensors", "*.json"])
        return _read_checkpoint_dir(folder)
    if hasattr(source, "save_pretrained") and hasattr(source, "config"):
        # Saving gives the on-disk names, whatever this transformers version calls the modules in memory.
        with tempfile.TemporaryDirectory() as directory:
            source.save_pretrained(directory, safe_serialization=True)
            return _read_checkpoint_dir(directory)
    raise TypeError(
        f"`source` must be a ViT/DeiT model, a local checkpoint directory or a Hub id, got {type(source).__name__}."
    )


def local_folder(name_or_path: str) -> str | None:
    """`name_or_path` as a local folder (`~` expanded), or None for a Hub id. A path-like name (starting with / . or ~,
    or not of the form `namespace/name`) that is no folder is said to be a missing folder, not a bad repo id."""
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+|[\w.-]+", name_or_path) is not None
    if name_or_path.startswith(("/", ".", "~")) or not hub_id:
        raise FileNotFoundError(f"folder {name_or_path!r} does not exist (nor is it a Hub id such as namespace/name).")
    return None


def _read_checkpoint_dir(directory: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"No config.json in {directory!r}: not a transformers checkpoint directory.")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(single):
        return config, load_file(single)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
        state_dict: dict[str, torch.Tensor] = {}
        for shard in shards:
            state_dict.update(load_file(os.path.join(directory, shard)))
        return config, state_dict
    raise FileNotFoundError(
        f"No model.safetensors (or sharded index) in {directory!r}; only safetensors checkpoints are converted."
    )


def convert_vit_to_sparse_vit(source: Any, model_class: type, **config_overrides: Any):
    """Build `model_class` (a SparseViT image classifier) from a ViT/DeiT source with identical weights."""
    source_config, source_state = load_source_checkpoint(source)
    config = sparse_vit_config_from_source(source_config, **config_overrides)
    prefix = "deit" if config.use_distillation_token else "vit"
    state_dict = convert_state_dict(source_state, prefix)
    model = model_class(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Conversion mismatch: missing SparseViT keys {missing}, unexpected keys {unexpected}.")
    wrong_shapes = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state_dict.items() if v.shape != expected[k].shape}
    if wrong_shapes:
        raise ValueError(f"Conversion shape mismatch (source, SparseViT): {wrong_shapes}.")
    model.load_state_dict(state_dict, strict=True)
    return model
