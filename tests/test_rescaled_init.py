"""Layer-wise rescaled initialisation: closed-form density rescale and GradInit (tiny models, CPU, offline)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from hf_sparse.tost.masks import MaskConfig, get_masks, prune_model
from hf_sparse.tost.rescaled_init import density_rescale, gradinit_rescale, scaled_parameter_names


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 16)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(16, 32)
        self.mlp.activation_fn = nn.GELU()
        self.mlp.fc2 = nn.Linear(32, 16)
        self.norm = nn.LayerNorm(16)
        self.classifier = nn.Linear(16, 2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(inputs)
        hidden = hidden + self.mlp.fc2(self.mlp.activation_fn(self.mlp.fc1(hidden)))
        return self.classifier(self.norm(hidden))


def separable_batches(count: int = 12, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        inputs = torch.randn(32, 4, generator=generator)
        batches.append((inputs, (inputs[:, 0] > 0).long()))
    return batches


def badly_scaled_sparse_net() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3.0)  # an initialisation far too large: GradInit should shrink it
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5, patterns=(r"mlp\.fc\d$",)))
    return model


def test_density_rescale_is_exactly_one_over_sqrt_density():
    model = badly_scaled_sparse_net()
    before = {name: model.get_submodule(name).weight.detach().clone() for name in ("mlp.fc1", "mlp.fc2")}
    factors = density_rescale(model)
    for name, factor in factors.items():
        density = model.get_submodule(name).weight_mask.float().mean().item()
        assert factor == 1 / math.sqrt(density)
        torch.testing.assert_close(model.get_submodule(name).weight.detach(), before[name] * factor, rtol=0, atol=0)
    with pytest.raises(ValueError, match="masks"):
        density_rescale(TinyNet())


def test_scaled_parameter_selection():
    names = scaled_parameter_names(TinyNet())
    assert names == ["embed.weight", "mlp.fc1.weight", "mlp.fc2.weight", "norm.weight", "classifier.weight"]
    assert "norm.weight" not in scaled_parameter_names(TinyNet(), include_layernorm=False)
    assert "embed.bias" in scaled_parameter_names(TinyNet(), include_bias=True)


@pytest.mark.parametrize("gamma", [1.0, 100.0], ids=["grad_norm_phase", "lookahead_phase"])
def test_gradinit_keeps_zeros_and_lowers_the_loss(gamma):
    model = badly_scaled_sparse_net()
    masks = {name: mask.clone() for name, mask in get_masks(model).items()}
    report = gradinit_rescale(model, separable_batches(), steps=25, gamma=gamma)

    for name, mask in masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    assert set(report.scales) == set(scaled_parameter_names(model, include_bias=True))  # biases too, as the ToST code
    assert any(abs(scale - 1.0) > 1e-3 for scale in report.scales.values())
    assert all(scale >= (0.0 if name.endswith("bias") else 0.01) for name, scale in report.scales.items())
    kinds = {entry["objective"] for entry in report.history}
    assert kinds == ({"grad_norm"} if gamma == 1.0 else {"lookahead"})
    assert report.loss_after < report.loss_before
    with torch.no_grad():  # the scales are baked into the model
        inputs, labels = separable_batches()[0]
        assert nn.functional.cross_entropy(model(inputs), labels).item() == pytest.approx(report.loss_after, rel=1e-5)


def test_gradinit_respects_min_scale():
    model = badly_scaled_sparse_net()
    report = gradinit_rescale(model, separable_batches(), steps=8, lr=0.5, min_scale=0.9, gamma=100.0)
    weights = {name: scale for name, scale in report.scales.items() if not name.endswith("bias")}
    assert min(weights.values()) >= 0.9
    assert any(scale == pytest.approx(0.9) for scale in weights.values())
    assert min(report.scales.values()) >= 0.0  # biases: floor 0, as the ToST code's bias group


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gradinit_on_hf_vit(attention):
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_labels=3,
        attn_implementation=attention,  # sdpa works too: gradinit forces the MATH kernel (double backward)
    )
    model = ViTForImageClassification(config)
    handle = prune_model(model, MaskConfig(method="random", sparsity=0.8, seed=0))
    generator = torch.Generator().manual_seed(0)
    batches = [
        {
            "pixel_values": torch.randn(4, 3, 8, 8, generator=generator),
            "labels": torch.randint(0, 3, (4,), generator=generator),
        }
        for _ in range(4)
    ]
    report = gradinit_rescale(model, batches, steps=3, gamma=100.0)
    assert report.steps == 3 and len(report.history) == 3
    assert "vit.layers.0.layernorm_before.weight" in report.scales
    assert "vit.embeddings.position_embeddings" not in report.scales
    for name, mask in handle.masks.items():
        assert (model.get_submodule(name).weight[~mask] == 0).all()
    assert math.isfinite(report.loss_after)


def test_gradinit_rejects_bad_arguments():
    model = TinyNet()
    with pytest.raises(ValueError, match="steps"):
        gradinit_rescale(model, separable_batches(), steps=-1)
    with pytest.raises(ValueError, match="min_scale"):
        gradinit_rescale(model, separable_batches(), min_scale=0.0)
    with pytest.raises(ValueError, match="masks"):
        gradinit_rescale(model, separable_batches(), masks={"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="ran out"):
        gradinit_rescale(model, iter(separable_batches(2)), steps=2, gamma=100.0)
