"""Ghost soft neurons and ghost skip connections (tiny models, CPU, offline)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification
from transformers.activations import ACT2FN

from hf_sparse.tost.ghosts import (
    GhostActivation,
    GhostSchedule,
    attach_ghost_activations,
    attach_ghost_skips,
    ghost_skip_alpha,
    identity_like,
)
from hf_sparse.tost.masks import MaskConfig, prune_model


def tiny_vit(seed: int = 0, hidden_act: str = "gelu") -> ViTForImageClassification:
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=8,
        patch_size=4,
        num_labels=3,
        hidden_act=hidden_act,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


class TinyMLP(nn.Module):
    """fc1 expands 8 -> 16, fc2 contracts 16 -> 8, `square` keeps 8, `odd` maps 8 -> 5."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(8, 16)
        self.mlp.activation_fn = nn.ReLU()
        self.mlp.fc2 = nn.Linear(16, 8)
        self.square = nn.Linear(8, 8)
        self.odd = nn.Linear(8, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp.fc2(self.mlp.activation_fn(self.mlp.fc1(inputs)))
        return self.odd(self.square(hidden))


PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------------------------- soft neurons


def test_gelu_ghost_follows_x_phi_lambda_x_and_is_exactly_gelu_at_the_end():
    inputs = torch.linspace(-6, 6, 101)
    ghost = GhostActivation(ACT2FN["gelu"], lambda_0=0.5)
    assert ghost.kind == "gelu"
    for progress in (0.0, 0.3, 0.999):
        ghost.set_progress(progress)
        sharpness = 0.5 + 0.5 * progress
        expected = inputs * 0.5 * (1 + torch.erf(sharpness * inputs / math.sqrt(2)))
        torch.testing.assert_close(ghost(inputs), expected)
    ghost.set_progress(1.0)
    assert torch.equal(ghost(inputs), nn.functional.gelu(inputs))


def test_relu_ghost_blends_swish_into_relu():
    inputs = torch.linspace(-4, 4, 41)
    ghost = GhostActivation(nn.ReLU(), progress=0.0)
    assert ghost.kind == "relu"
    torch.testing.assert_close(ghost(inputs), inputs * torch.sigmoid(inputs))
    ghost.set_progress(0.25)
    torch.testing.assert_close(ghost(inputs), 0.75 * inputs * torch.sigmoid(inputs) + 0.25 * torch.relu(inputs))
    ghost.set_progress(1.0)
    assert torch.equal(ghost(inputs), torch.relu(inputs))


def test_ghost_activations_on_hf_vit_are_removed_without_a_trace():
    model = tiny_vit()
    reference = copy.deepcopy(model)  # a model that never had ghosts
    originals = {name: module.mlp.activation_fn for name, module in model.vit.layers.named_children()}
    keys = list(model.state_dict())
    parameter_count = sum(p.numel() for p in model.parameters())

    ghosts = attach_ghost_activations(model)
    assert set(ghosts.modules) == {"vit.layers.0.mlp", "vit.layers.1.mlp"}
    assert isinstance(model.vit.layers[0].mlp.activation_fn, GhostActivation)
    assert list(model.state_dict()) == keys  # parameterless: no key changes while attached
    assert not torch.allclose(model(pixel_values=PIXELS).logits, reference(pixel_values=PIXELS).logits)

    ghosts.set_progress(1.0)
    assert torch.equal(model(pixel_values=PIXELS).logits, reference(pixel_values=PIXELS).logits)
    ghosts.remove()
    ghosts.remove()  # idempotent
    for name, layer in model.vit.layers.named_children():
        assert layer.mlp.activation_fn is originals[name]
    assert list(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == parameter_count
    assert torch.equal(model(pixel_values=PIXELS).logits, reference(pixel_values=PIXELS).logits)


def test_ghost_activation_errors():
    with pytest.raises(ValueError, match=r"pattern.*activation_fn"):
        attach_ghost_activations(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="kind"):
        GhostActivation(nn.Tanh())
    with pytest.raises(ValueError, match=r"`kind`.*'auto', 'gelu', 'relu'"):
        GhostActivation(nn.GELU(), kind="mish")
    with pytest.raises(ValueError, match="parameters"):
        GhostActivation(nn.PReLU())
    with pytest.raises(ValueError, match="progress"):
        GhostActivation(nn.GELU()).set_progress(1.5)
    model = tiny_vit()
    attach_ghost_activations(model)
    with pytest.raises(ValueError, match="already"):
        attach_ghost_activations(model)


# --------------------------------------------------------------------------------------------- skip connections


def test_identity_like_shapes_by_hand():
    x = torch.arange(8.0).view(2, 4)
    torch.testing.assert_close(identity_like(x, 4), x)
    torch.testing.assert_close(identity_like(x, 8), torch.cat([x, x], dim=-1))  # fc1: tiled
    wide = torch.arange(16.0).view(2, 8)
    torch.testing.assert_close(identity_like(wide, 4), (wide[:, :4] + wide[:, 4:]) / 2)  # fc2: chunk mean
    torch.testing.assert_close(identity_like(identity_like(x, 12), 4), x)  # fc2 after fc1 gives x back
    odd = identity_like(torch.arange(8.0).view(1, 8), 5)
    torch.testing.assert_close(odd, nn.functional.adaptive_avg_pool1d(torch.arange(8.0).view(1, 1, 8), 5).view(1, 5))


def test_ghost_skip_adds_exactly_alpha_times_g():
    torch.manual_seed(0)
    model = TinyMLP()
    names = ("mlp.fc1", "mlp.fc2", "square", "odd")
    shapes = {"mlp.fc1": (3, 8), "mlp.fc2": (3, 16), "square": (3, 8), "odd": (3, 8)}
    inputs = {name: torch.randn(shape) for name, shape in shapes.items()}
    plain = {name: model.get_submodule(name)(inputs[name]) for name in names}

    skips = attach_ghost_skips(model, patterns=r"(fc\d|square|odd)$", alpha_0=0.8)
    skips.set_progress(0.25)
    assert skips.alpha == pytest.approx(0.6)
    x = inputs["mlp.fc1"]
    torch.testing.assert_close(model.mlp.fc1(x), plain["mlp.fc1"] + 0.6 * torch.cat([x, x], dim=-1))
    x = inputs["mlp.fc2"]
    torch.testing.assert_close(model.mlp.fc2(x), plain["mlp.fc2"] + 0.6 * (x[:, :8] + x[:, 8:]) / 2)
    x = inputs["square"]
    torch.testing.assert_close(model.square(x), plain["square"] + 0.6 * x)
    x = inputs["odd"]
    torch.testing.assert_close(model.odd(x), plain["odd"] + 0.6 * identity_like(x, 5))

    skips.set_progress(1.0)  # alpha 0: bit-identical
    assert skips.alpha == 0.0
    assert all(torch.equal(model.get_submodule(name)(inputs[name]), plain[name]) for name in names)
    skips.set_progress(0.5)
    skips.remove()
    assert not skips.active
    assert all(torch.equal(model.get_submodule(name)(inputs[name]), plain[name]) for name in names)
    assert all(not model.get_submodule(name)._forward_hooks for name in names)


def test_alpha_schedules():
    assert ghost_skip_alpha(0.0) == 1.0 and ghost_skip_alpha(0.5, 2.0) == 1.0 and ghost_skip_alpha(1.0) == 0.0
    assert ghost_skip_alpha(0.5, schedule="cosine") == pytest.approx(0.5)
    assert ghost_skip_alpha(0.25, schedule="cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match=r"`schedule`.*'linear', 'cosine'"):
        ghost_skip_alpha(0.5, schedule="step")


def test_ghosts_on_hf_vit_with_masks_and_gradients():
    model = tiny_vit()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    batch = {"pixel_values": PIXELS, "labels": torch.tensor([0, 2])}
    handle = prune_model(model, MaskConfig(method="magnitude", sparsity=0.9))
    prune_model(reference, MaskConfig(method="magnitude", sparsity=0.9))

    ghosts = attach_ghost_activations(model)
    skips = attach_ghost_skips(model)  # around the masked Linears
    assert set(skips.module_names) == set(handle.masks)
    model(**batch).loss.backward()
    reference(**batch).loss.backward()
    for (name, parameter), (_, reference_parameter) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.isfinite(parameter.grad).all(), name
    grad, reference_grad = model.vit.layers[0].mlp.fc1.weight.grad, reference.vit.layers[0].mlp.fc1.weight.grad
    assert not torch.allclose(grad, reference_grad)  # the ghosts change the gradient signal...
    assert (grad[~model.vit.layers[0].mlp.fc1.weight_mask] == 0).all()  # ...but never revive pruned weights

    schedule = GhostSchedule(end_fraction=0.2)
    assert schedule.update(0.1, ghosts, skips) is False and skips.alpha == pytest.approx(0.5)
    assert schedule.update(0.2, ghosts, skips) is True
    assert not ghosts.active and not skips.active
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits, rtol=0, atol=0)


def test_ghost_schedule():
    schedule = GhostSchedule(end_fraction=0.25)
    assert schedule(0.0) == 0.0 and schedule(0.125) == 0.5 and schedule(0.25) == 1.0 and schedule(1.3) == 1.0
    assert not schedule.is_finished(0.2) and schedule.is_finished(0.25)
    with pytest.raises(ValueError, match="end_fraction"):
        GhostSchedule(end_fraction=0.0)
    with pytest.raises(ValueError, match="training_progress"):
        schedule(-0.1)
