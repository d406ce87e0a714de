"""ToST on transformers' own `ResNetForImageClassification`, end to end on tiny data: every mask on the convolutions,
ghost ReLUs and ghost skips that change training and leave no trace, GradInit on convolution and batch-norm weights,
exact zeros in a plain transformers checkpoint, and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import TrainerCallback

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.tost import TOST_MASK_METHODS, GhostActivation, get_masks, read_masks
from hf_sparse.tost.ghosts import identity_like_feature_map

from tri_level_helpers import StopAt, tiny_image_dataset, tiny_resnet, with_tiny_transform

CONVOLUTIONS = {
    "resnet.encoder.stages.0.layers.0.layer.0.convolution",
    "resnet.encoder.stages.0.layers.0.layer.1.convolution",
    "resnet.encoder.stages.1.layers.0.shortcut.convolution",
    "resnet.encoder.stages.1.layers.0.layer.0.convolution",
    "resnet.encoder.stages.1.layers.0.layer.1.convolution",
}


def arguments(output_dir, **overrides) -> ToSTTrainingArguments:
    fields = dict(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, learning_rate=0.05,
                  optim="sgd", optim_args="momentum=0.9", lr_scheduler_type="constant", logging_steps=1,
                  save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, mask_method="snip",
                  sparsity=0.9)
    fields.update(overrides)
    return ToSTTrainingArguments(**fields)


@pytest.fixture(scope="module")
def data():
    return with_tiny_transform(tiny_image_dataset(64), train=False)


@pytest.mark.parametrize("method", TOST_MASK_METHODS)
def test_each_mask_prunes_the_convolutions_after_the_stem(tmp_path, data, method):
    overrides = {"lottery_ticket_round_fraction": 0.25} if method == "lottery_ticket" else {}
    model = tiny_resnet()
    trainer = ToSTTrainer(model=model, args=arguments(tmp_path, mask_method=method, **overrides), train_dataset=data)
    trainer.train()
    masks = get_masks(model)
    assert set(masks) == CONVOLUTIONS  # the stem and the classifier stay dense
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert isinstance(modules[name], nn.Conv2d)
        assert abs(float((~mask).float().mean()) - 0.9) <= 0.01, name  # per layer (mask_scope="layer")
        assert torch.count_nonzero(modules[name].weight[~mask]) == 0
    assert torch.count_nonzero(model.resnet.embedder.embedder.convolution.weight == 0) == 0
    assert model.config.weight_sparsity["method"] == method


def test_global_scope_and_late_rewinding(tmp_path, data):
    trainer = ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path, mask_scope="global", sparsity=0.8),
                          train_dataset=data)
    assert abs(trainer.setup_sparsity()["mask_sparsity"] - 0.8) <= 0.005
    args = arguments(tmp_path, mask_method="lottery_ticket", sparsity=0.5, lottery_ticket_round_fraction=0.5,
                     lottery_ticket_rewind_step=1, rescaled_init="none")
    trainer = ToSTTrainer(model=tiny_resnet(), args=args, train_dataset=data)
    assert abs(trainer.setup_sparsity()["mask_sparsity"] - 0.5) <= 0.005
    assert trainer.mask_metadata["rewind"] == "step" and trainer.mask_metadata["rounds"] == 4


class GhostRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        relus = [m for m in model.modules() if isinstance(m, GhostActivation)]
        # a ghost branch reads its convolution's input (a forward pre-hook) and joins after the batch norm
        hooks = sum(len(m._forward_pre_hooks) for m in model.modules() if isinstance(m, nn.Conv2d))
        hooks += sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        self.steps.append((state.global_step, len(relus), hooks))


def test_ghosts_change_training_and_leave_no_trace(tmp_path, data):
    model = tiny_resnet()
    keys, count = list(model.state_dict()), sum(p.numel() for p in model.parameters())
    recorder = GhostRecorder()
    args = arguments(tmp_path, max_steps=6, ghost_soft_neurons=True, ghost_skip_connections=True,
                     ghost_end_fraction=0.5, rescaled_init="none", label_smoothing=0.0)
    trainer = ToSTTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    # 5 ReLUs (the stem's, the first conv layer's of each block, after each residual sum) become ghosts; the 4
    # masked 3x3 convolutions get a ghost branch (2 hooks each), the 1x1 shortcut none
    assert recorder.steps[:3] == [(1, 5, 8), (2, 5, 8), (3, 5, 8)]
    assert all(ghosts == 0 and hooks == 0 for _, ghosts, hooks in recorder.steps[3:])
    assert trainer.ghost_removed_at_step == 3
    assert all(type(m.activation) is nn.ReLU for m in model.modules() if hasattr(m, "activation")
               and not isinstance(m.activation, nn.Identity))
    assert list(model.state_dict()) == keys and sum(p.numel() for p in model.parameters()) == count

    plain = tiny_resnet()
    vanilla = arguments(tmp_path / "plain", max_steps=6, ghost_soft_neurons=False, ghost_skip_connections=False,
                        rescaled_init="none", label_smoothing=0.0)
    ToSTTrainer(model=plain, args=vanilla, train_dataset=data).train()
    masks = get_masks(model)
    assert all(torch.equal(masks[name], mask) for name, mask in get_masks(plain).items())  # the same SNIP mask
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))  # ghosts changed it


def test_identity_like_feature_map_follows_a_strided_convolution():
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).view(2, 4, 4, 4)
    out = identity_like_feature_map(x, torch.Size((2, 8, 2, 2)))
    pooled = nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(out, torch.cat([pooled, pooled], dim=1))  # channels tiled, space averaged
    torch.testing.assert_close(identity_like_feature_map(x, x.shape), x)


def test_gradinit_scales_convolutions_and_batch_norms_and_keeps_the_zeros(tmp_path, data):
    trainer = ToSTTrainer(model=tiny_resnet(), train_dataset=data,
                          args=arguments(tmp_path, rescaled_init="gradinit", rescaled_init_steps=4, gradinit_lr=0.05))
    trainer.setup_sparsity()
    scales = trainer.gradinit_report.scales
    assert any(name.endswith("convolution.weight") for name in scales)
    assert any(name.endswith("normalization.weight") for name in scales)
    modules = dict(trainer.model.named_modules())
    for name, mask in get_masks(trainer.model).items():
        assert torch.count_nonzero(modules[name].weight[~mask]) == 0


def test_saved_model_is_a_plain_transformers_resnet_with_the_zeros(tmp_path, data):
    trainer = ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path, ghost_end_fraction=1.0, ghost_skip_connections=True),
                          train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert not any(name.endswith(".py") for name in files) and "sparsity_masks.safetensors" in files
    assert "auto_map" not in json.loads((tmp_path / "final" / "config.json").read_text())
    masks, _ = read_masks(tmp_path / "final")
    code = (
        "import sys, json\n"
        "sys.modules['hf_sparse'] = None\n"
        "from transformers import AutoModelForImageClassification\n"
        f"model = AutoModelForImageClassification.from_pretrained({str(tmp_path / 'final')!r})\n"
        "modules = dict(model.named_modules())\n"
        "print(json.dumps({'type': type(model).__name__, 'sparsity': model.config.weight_sparsity,\n"
        f"    'zeros': {{name: int((modules[name].weight == 0).sum()) for name in {sorted(masks)!r}}}}}))\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, cwd="/")
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert loaded["type"] == "ResNetForImageClassification" and loaded["sparsity"]["method"] == "snip"
    for name, mask in masks.items():
        assert loaded["zeros"][name] >= int((~mask).sum())
    card = (tmp_path / "final" / "README.md").read_text()
    assert "trust_remote_code" not in card and "weight mask method | snip" in card


def test_resume_keeps_the_masks_and_matches_an_uninterrupted_run(tmp_path, data):
    common = dict(max_steps=-1, num_train_epochs=2, save_strategy="steps", save_steps=5, ghost_end_fraction=0.5,
                  rescaled_init_steps=2, lr_scheduler_type="cosine")
    full = ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path / "full", **common), train_dataset=data)
    full.train()
    ToSTTrainer(model=tiny_resnet(), args=arguments(tmp_path / "resumed", **common), train_dataset=data,
                callbacks=[StopAt(5)]).train()
    resumed = ToSTTrainer(model=tiny_resnet(seed=7), args=arguments(tmp_path / "resumed", **common),
                          train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.sparsity_setup["mask_source"] == "checkpoint"
    assert resumed.state.global_step == full.state.global_step == 16
    full_masks, resumed_masks = get_masks(full.model), get_masks(resumed.model)
    assert full_masks.keys() == resumed_masks.keys()
    assert all(torch.equal(full_masks[name], resumed_masks[name]) for name in full_masks)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
