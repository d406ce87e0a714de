"""ToSTTrainer end to end on a tiny with_transform data set: masks, exact zeros, ghosts, rescaled init, label
smoothing, stop-and-resume, saving and argument errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageClassification, TrainerCallback, ViTConfig, ViTForImageClassification

from hf_sparse import SparseViTForImageClassification, ToSTTrainer, ToSTTrainingArguments
from hf_sparse.tost import MASKS_FILENAME, GhostActivation, MaskConfig, get_masks, prune_model, save_masks
from hf_sparse.tost.masks import read_masks
from hf_sparse.tost import TOST_MASK_METHODS, default_rescaled_init_steps, label_smoothing_epsilon

from tri_level_helpers import StopAt, tiny_image_dataset, tiny_sparse_vit, with_tiny_transform


def arguments(output_dir, **overrides) -> ToSTTrainingArguments:
    fields = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        mask_method="snip",
        sparsity=0.9,
        **PAPER_RECIPE,  # every technique on, as in the paper (the family defaults are tested on their own)
    )
    fields.update(overrides)
    return ToSTTrainingArguments(**fields)


PAPER_RECIPE = dict(ghost_soft_neurons=True, ghost_skip_connections=True, ghost_end_fraction=0.1, ghost_skip_alpha=1.0,
                    rescaled_init="gradinit", rescaled_init_steps=2, label_smoothing=0.1)  # 180 by default: slow


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return with_tiny_transform(tiny_image_dataset(64), train=False)


def prunable_sparsity(model) -> dict[str, float]:
    return {name: float((mask == 0).float().mean()) for name, mask in get_masks(model).items()}


def assert_pruned_weights_are_zero(model):
    masks = get_masks(model)
    assert masks
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        assert torch.equal(modules[name].weight[~mask], torch.zeros_like(modules[name].weight[~mask])), name


@pytest.mark.parametrize("method", TOST_MASK_METHODS)
def test_each_mask_method_reaches_the_target_sparsity(tmp_path, data, method):
    overrides = {"lottery_ticket_round_fraction": 0.25} if method == "lottery_ticket" else {}
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, mask_method=method, **overrides),
                          train_dataset=data)
    trainer.train()
    assert trainer.sparsity_setup["mask_source"] == "computed"
    layers = prunable_sparsity(trainer.model)
    assert len(layers) == 12  # q, k, v, o, fc1, fc2 of 2 blocks
    assert all(abs(value - 0.9) <= 0.005 for value in layers.values()), layers  # mask_scope="layer"
    zeros = sum(int((m.weight == 0).sum()) for n, m in trainer.model.named_modules() if n in layers)
    total = sum(m.weight.numel() for n, m in trainer.model.named_modules() if n in layers)
    assert abs(zeros / total - 0.9) <= 0.005
    assert_pruned_weights_are_zero(trainer.model)
    assert trainer.model.config.weight_sparsity["method"] == method
    logged = [entry["sparsity"] for entry in trainer.state.log_history if "sparsity" in entry]
    assert logged and all(abs(value - 0.9) <= 0.005 for value in logged)


def test_global_scope_and_imp_rewind_step(tmp_path, data):
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, mask_scope="global", sparsity=0.8),
                          train_dataset=data)
    setup = trainer.setup_sparsity()
    assert abs(setup["mask_sparsity"] - 0.8) <= 0.005
    assert len(set(round(v, 3) for v in prunable_sparsity(trainer.model).values())) > 1  # one global threshold
    args = arguments(tmp_path, mask_method="lottery_ticket", sparsity=0.5, lottery_ticket_round_fraction=0.5,
                     lottery_ticket_rewind_step=1, rescaled_init="none")
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    setup = trainer.setup_sparsity()
    assert abs(setup["mask_sparsity"] - 0.5) <= 0.005
    assert trainer.mask_metadata["rewind"] == "step" and trainer.mask_metadata["rounds"] == 4
    too_late = arguments(tmp_path, mask_method="lottery_ticket", lottery_ticket_rewind_step=3,
                         lottery_ticket_round_fraction=0.5)
    with pytest.raises(ValueError, match="lottery_ticket_rewind_step"):
        ToSTTrainer(model=tiny_sparse_vit(), args=too_late, train_dataset=data).train()


def test_pruned_weights_stay_exactly_zero_with_adamw_weight_decay_and_accumulation(tmp_path, data):
    model = tiny_sparse_vit()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = arguments(tmp_path, max_steps=6, gradient_accumulation_steps=2, weight_decay=0.1, optim="adamw_torch",
                     learning_rate=1e-2, mask_method="magnitude")
    trainer = ToSTTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 6
    assert_pruned_weights_are_zero(model)
    modules = dict(model.named_modules())
    for name, mask in get_masks(model).items():
        weight = modules[name].weight
        assert not torch.equal(weight[mask], initial[f"{name}.weight"][mask])  # the kept weights trained
        state = trainer.optimizer.state[weight]  # Adam moments of pruned weights never moved
        assert torch.count_nonzero(state["exp_avg"][~mask]) == 0 and torch.count_nonzero(state["exp_avg_sq"][~mask]) == 0


def test_gradient_accumulation_matches_one_larger_batch_with_label_smoothing(tmp_path, data):
    # SGD: Adam would turn float noise in k_proj.bias's gradient (exactly 0 in theory) into full-size steps
    common = dict(max_steps=2, mask_method="magnitude", rescaled_init="none", optim="sgd", learning_rate=0.1,
                  max_grad_norm=0.0)  # no clipping: it would hide a mis-scaled loss
    large = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "a", per_device_train_batch_size=8, **common),
                        train_dataset=data)
    large.train()
    accumulated = ToSTTrainer(
        model=tiny_sparse_vit(),
        args=arguments(tmp_path / "b", per_device_train_batch_size=4, gradient_accumulation_steps=2, **common),
        train_dataset=data,
    )
    accumulated.train()
    for (name, a), (_, b) in zip(large.model.named_parameters(), accumulated.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


class GhostRecorder(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        mlp = model.sparse_vit.encoder.layers[0].mlp
        q_proj = model.sparse_vit.encoder.layers[0].attention.q_proj
        self.steps.append((state.global_step, isinstance(mlp.activation_fn, GhostActivation), len(q_proj._forward_hooks)))


def test_ghosts_present_early_and_gone_after_the_end_fraction(tmp_path, data):
    model = tiny_sparse_vit()
    original_activation = model.sparse_vit.encoder.layers[0].mlp.activation_fn
    keys = list(model.state_dict())
    parameter_count = sum(p.numel() for p in model.parameters())
    recorder = GhostRecorder()
    args = arguments(tmp_path, max_steps=10, ghost_end_fraction=0.3, rescaled_init="none")
    trainer = ToSTTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    # progress = steps done / 10 at each step begin: ghosts drive steps 1-3; at 3/10 = 0.3 they are removed
    assert recorder.steps[:3] == [(1, True, 1), (2, True, 1), (3, True, 1)]
    assert all(not soft and hooks == 0 for _, soft, hooks in recorder.steps[3:])
    assert trainer.ghost_removed_at_step == 3
    progress = [entry["ghost_progress"] for entry in trainer.state.log_history if "ghost_progress" in entry]
    assert progress[:5] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0], abs=1e-3)  # the value used in each step
    assert model.sparse_vit.encoder.layers[0].mlp.activation_fn is original_activation
    assert not any(isinstance(m, GhostActivation) for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert list(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == parameter_count


def test_ghosts_can_be_switched_off_one_by_one(tmp_path, data):
    recorder = GhostRecorder()
    args = arguments(tmp_path, max_steps=2, ghost_soft_neurons=False, rescaled_init="none")
    ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data, callbacks=[recorder]).train()
    assert recorder.steps[0] == (1, False, 1)
    recorder = GhostRecorder()
    args = arguments(tmp_path, max_steps=2, ghost_skip_connections=False, rescaled_init="none")
    ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data, callbacks=[recorder]).train()
    assert recorder.steps[0] == (1, True, 0)


def test_rescaled_init_changes_the_scale_and_keeps_the_zeros(tmp_path, data):
    def setup(rescaled_init, **overrides):
        trainer = ToSTTrainer(
            model=tiny_sparse_vit(), args=arguments(tmp_path, rescaled_init=rescaled_init, **overrides),
            train_dataset=data,
        )
        trainer.setup_sparsity()
        return trainer

    plain = setup("none")
    gradinit = setup("gradinit", rescaled_init_steps=5, gradinit_lr=0.05)
    density = setup("density")
    assert gradinit.sparsity_setup["rescaled_init_steps"] == 5
    plain_weights = dict(plain.model.named_parameters())
    masks = get_masks(plain.model)
    for trainer in (gradinit, density):
        assert_pruned_weights_are_zero(trainer.model)
        for name, mask in get_masks(trainer.model).items():
            assert torch.equal(mask, masks[name])  # the same mask: rescaling comes after masking
    scales = gradinit.gradinit_report.scales
    assert any(abs(scale - 1.0) > 1e-3 for scale in scales.values())
    for name, parameter in gradinit.model.named_parameters():
        if name in scales:  # theta = alpha * theta_0 for every scaled tensor
            torch.testing.assert_close(parameter, scales[name] * plain_weights[name], rtol=1e-5, atol=1e-7)
    density_weights = dict(density.model.named_parameters())
    for name, mask in masks.items():
        factor = 1.0 / math.sqrt(mask.float().mean().item())
        torch.testing.assert_close(density_weights[f"{name}.weight"], factor * plain_weights[f"{name}.weight"])
    # the ToST README's 180 iterations, whatever the run's length
    assert default_rescaled_init_steps(40) == default_rescaled_init_steps(10**6) == 180


def test_label_smoothing_is_the_papers_alpha_over_c_minus_one(tmp_path, data):
    alpha, classes = 0.1, 4
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, label_smoothing=alpha), train_dataset=data)
    batch = trainer.data_collator([data[i] for i in range(8)])
    loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
    target = torch.full((8, classes), alpha / (classes - 1))
    target[torch.arange(8), batch["labels"]] = 1 - alpha
    manual = -(target * F.log_softmax(outputs.logits.float(), dim=-1)).sum(dim=-1).mean()
    torch.testing.assert_close(loss, manual)
    assert label_smoothing_epsilon(alpha, classes) == pytest.approx(alpha * classes / (classes - 1))
    assert trainer.loss_is_scaled_for_ga is False  # a per-batch mean: the Trainer divides it by the GA steps
    plain = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, label_smoothing=0.0), train_dataset=data)
    torch.testing.assert_close(plain.compute_loss(plain.model, dict(batch)), plain.model(**batch).loss)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        arguments(tmp_path, label_smoothing=0.1, label_smoothing_factor=0.1)
    arguments(tmp_path, label_smoothing=0.0, label_smoothing_factor=0.1)  # HF's own convention alone is fine


def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path, data):
    # 8 steps per epoch, 3 epochs; the stop (step 10) is mid-epoch and inside the ghost phase (ends at step 12)
    common = dict(max_steps=-1, num_train_epochs=3, save_strategy="steps", save_steps=5, ghost_end_fraction=0.5,
                  rescaled_init_steps=2, lr_scheduler_type="cosine")
    full = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "full", **common), train_dataset=data)
    full.train()

    interrupted = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "resumed", **common),
                              train_dataset=data, callbacks=[StopAt(10)])
    interrupted.train()
    assert interrupted.state.global_step == 10
    checkpoint = tmp_path / "resumed" / "checkpoint-10"
    assert (checkpoint / MASKS_FILENAME).exists()

    resumed = ToSTTrainer(model=tiny_sparse_vit(seed=123), args=arguments(tmp_path / "resumed", **common),
                          train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == full.state.global_step == 24
    assert resumed.sparsity_setup["mask_source"] == "checkpoint" and resumed.gradinit_report is None
    assert resumed.ghost_removed_at_step == full.ghost_removed_at_step == 12
    full_masks, resumed_masks = get_masks(full.model), get_masks(resumed.model)
    assert full_masks.keys() == resumed_masks.keys()
    assert all(torch.equal(full_masks[name], resumed_masks[name]) for name in full_masks)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert_pruned_weights_are_zero(resumed.model)

    os.remove(tmp_path / "resumed" / "checkpoint-5" / MASKS_FILENAME)
    stale = ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "resumed", **common), train_dataset=data)
    with pytest.raises(FileNotFoundError, match=MASKS_FILENAME):
        stale.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-5"))


def test_saved_model_reloads_as_a_plain_model_with_exact_zeros(tmp_path, data):
    args = arguments(tmp_path, max_steps=6, ghost_end_fraction=1.0)  # ghosts live until the very end
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    masks, metadata = read_masks(tmp_path / "final")
    assert metadata["method"] == "snip" and metadata["target_sparsity"] == 0.9
    loaded, info = AutoModelForImageClassification.from_pretrained(str(tmp_path / "final"), output_loading_info=True)
    assert type(loaded) is SparseViTForImageClassification
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(loaded.sparse_vit.encoder.layers[0].mlp.activation_fn) is type(
        tiny_sparse_vit().sparse_vit.encoder.layers[0].mlp.activation_fn
    )
    assert not any(isinstance(m, GhostActivation) for m in loaded.modules())
    assert all(not m._forward_hooks for m in loaded.modules())
    assert not get_masks(loaded) and "weight_mask" not in str(list(loaded.state_dict()))
    modules = dict(loaded.named_modules())
    for name, mask in masks.items():
        assert torch.count_nonzero(modules[name].weight[~mask]) == 0
        assert torch.equal(modules[name].weight, dict(trainer.model.named_modules())[name].weight)
    assert loaded.config.weight_sparsity["method"] == "snip"
    assert loaded.config.weight_sparsity["scope"] == "layer"
    assert abs(loaded.config.weight_sparsity["sparsity"] - 0.9) <= 0.005


def test_masks_already_on_the_model_or_from_a_file_are_used_as_they_are(tmp_path, data):
    model = tiny_sparse_vit()
    prune_model(model, MaskConfig(method="random", sparsity=0.7, seed=3))
    expected = {name: mask.clone() for name, mask in get_masks(model).items()}
    trainer = ToSTTrainer(model=model, args=arguments(tmp_path, rescaled_init="none"), train_dataset=data)
    assert trainer.setup_sparsity()["mask_source"] == "model"
    assert all(torch.equal(get_masks(model)[name], mask) for name, mask in expected.items())
    save_masks(model, tmp_path / "masks")
    args = arguments(tmp_path, rescaled_init="none", mask_path=str(tmp_path / "masks"))
    trainer = ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    assert trainer.setup_sparsity()["mask_source"] == "mask_path"
    assert all(torch.equal(get_masks(trainer.model)[name], mask) for name, mask in expected.items())


def test_hf_vit_trains_with_the_full_recipe(tmp_path, data):
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  image_size=8, patch_size=4, num_channels=1, num_labels=4)
    )
    trainer = ToSTTrainer(model=vit, args=arguments(tmp_path, max_steps=3, ghost_end_fraction=0.5), train_dataset=data)
    trainer.train()
    assert len(get_masks(vit)) == 6 and abs(trainer.sparsity_setup["mask_sparsity"] - 0.9) <= 0.005
    assert trainer.ghost_removed_at_step == 2
    assert_pruned_weights_are_zero(vit)


BAD_ARGUMENTS = [
    ({"mask_method": "l1"}, "mask_method"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": -0.1}, "sparsity"),
    ({"mask_scope": "block"}, "mask_scope"),
    ({"mask_batches": 0}, "mask_batches"),
    ({"mask_patterns": "("}, "mask_patterns"),
    ({"synflow_rounds": 0}, "synflow_rounds"),
    ({"lottery_ticket_rounds": 0}, "lottery_ticket_rounds"),
    ({"lottery_ticket_round_fraction": 0.0}, "lottery_ticket_round_fraction"),
    ({"lottery_ticket_round_fraction": 1.5}, "lottery_ticket_round_fraction"),
    ({"lottery_ticket_rewind_step": -1}, "lottery_ticket_rewind_step"),
    ({"ghost_end_fraction": 0.0}, "ghost_end_fraction"),
    ({"ghost_end_fraction": 1.2}, "ghost_end_fraction"),
    ({"ghost_soft_neurons": "yes"}, "ghost_soft_neurons"),
    ({"ghost_skip_alpha": -1.0}, "ghost_skip_alpha"),
    ({"ghost_skip_schedule": "step"}, "ghost_skip_schedule"),
    ({"rescaled_init": "kaiming"}, "rescaled_init"),
    ({"rescaled_init_steps": -1}, "rescaled_init_steps"),
    ({"gradinit_lr": 0.0}, "gradinit_lr"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"label_smoothing": 0.1, "label_smoothing_factor": 0.1}, "label_smoothing"),
]


@pytest.mark.parametrize("overrides,field", BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        arguments(tmp_path, **overrides)


def test_trainer_needs_tost_arguments_and_a_sensible_smoothing(tmp_path, data):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="ToSTTrainingArguments"):
        ToSTTrainer(model=tiny_sparse_vit(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="label_smoothing"):  # 0.9 > (C - 1) / C for 4 classes
        ToSTTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, label_smoothing=0.9), train_dataset=data)


def test_unset_recipe_fields_take_the_model_familys_recipe_and_set_ones_win(tmp_path, data):
    from hf_sparse.tost.arguments import FAMILY_RECIPES

    from tri_level_helpers import tiny_resnet

    def unset(**overrides):
        return ToSTTrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                                     report_to=[], use_cpu=True, disable_tqdm=True, **overrides)

    vit = ToSTTrainer(model=tiny_sparse_vit(), args=unset(), train_dataset=data)
    assert vit.family == "vit" and {name: getattr(vit.args, name) for name in FAMILY_RECIPES["vit"]} == FAMILY_RECIPES["vit"]
    # the CNN recipe is vanilla sparse training: no technique beat it on the ResNet benchmark (README)
    plain = ToSTTrainer(model=tiny_resnet(), args=unset(), train_dataset=data).args
    assert (plain.ghost_soft_neurons, plain.ghost_skip_connections, plain.rescaled_init, plain.label_smoothing) == (
        False, False, "none", 0.0)
    cnn = ToSTTrainer(model=tiny_resnet(), args=unset(label_smoothing=0.2), train_dataset=data)
    assert cnn.family == "cnn" and cnn.args.label_smoothing == 0.2  # set: kept
    assert cnn.args.ghost_end_fraction == FAMILY_RECIPES["cnn"]["ghost_end_fraction"]
    assert cnn.args.rescaled_init == FAMILY_RECIPES["cnn"]["rescaled_init"]
    hf_only = ToSTTrainer(model=tiny_sparse_vit(), args=unset(label_smoothing_factor=0.1), train_dataset=data)
    assert hf_only.args.label_smoothing == 0.0  # HF's own smoothing chosen: never both
