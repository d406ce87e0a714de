"""TriLevelTrainer end to end on a tiny with_transform data set: schedule, pruning, resume, errors."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import TrainerCallback, ViTConfig, ViTForImageClassification

from hf_sparse import TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.tri_level import KeepRatioSchedule, load_example_pruner

from tri_level_helpers import StopAt, tiny_image_dataset, tiny_sparse_vit, with_tiny_transform


def arguments(output_dir, **overrides) -> TriLevelTrainingArguments:
    fields = dict(
        output_dir=str(output_dir),
        num_train_epochs=3,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        example_pruning="forgetting",
        example_inactive_fraction=0.25,
        example_refresh_fraction=0.34,
        example_last_refresh_fraction=1.0,
        example_swap_fraction=0.125,
        token_keep_ratio=0.5,
        attention_keep_ratio=0.5,
        sparsity_warmup_fraction=0.2,
        sparsity_decay_fraction=0.4,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return TriLevelTrainingArguments(**fields)


class RatioRecorder(TrainerCallback):
    def __init__(self):
        self.ratios = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ratios.append((state.global_step, model.get_sparsity()["token_keep_ratio"]))


def test_trains_on_the_planned_subset_with_the_scheduled_ratios(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(64))
    recorder = RatioRecorder()
    args = arguments(tmp_path)
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data, callbacks=[recorder])
    result = trainer.train()
    # 64 examples, 25 % inactive -> 48 per epoch, batch 8 -> 6 optimizer steps per epoch, 3 epochs
    assert trainer.state.max_steps == 18 and trainer.state.global_step == 18
    assert trainer.samples_seen == 3 * 48
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    # the schedule: dense during warm-up, cosine down, then the final ratio
    schedule = args.keep_ratio_schedule
    expected = [schedule.ratios((step - 1) / 18, 0.5, 0.5)[0] for step, _ in recorder.ratios]
    assert [ratio for _, ratio in recorder.ratios] == pytest.approx(expected)
    assert recorder.ratios[0][1] == 1.0 and recorder.ratios[-1][1] == 0.5
    logged = [entry for entry in trainer.state.log_history if "examples_active_fraction" in entry]
    assert logged and all(entry["examples_active_fraction"] == 0.75 for entry in logged)
    assert logged[-1]["tokens_per_image"] < logged[0]["tokens_per_image"]
    assert {"images_per_second", "wall_clock_s", "samples_seen", "attention_keep_ratio"} <= set(logged[-1])
    # the forgetting refreshes swapped examples (refresh epochs 1 and 2)
    assert trainer.example_pruner.num_refreshes == 2
    # evaluation and the saved model use the final ratios
    assert trainer.model.config.token_keep_ratio == 0.5
    assert result.metrics["train_runtime"] > 0


def test_schedule_shape():
    args = TriLevelTrainingArguments(
        output_dir="unused", token_keep_ratio=0.7, attention_keep_ratio=0.4, report_to=[],
        sparsity_warmup_fraction=0.1, sparsity_decay_fraction=0.4,
    )
    schedule = args.keep_ratio_schedule
    assert schedule == KeepRatioSchedule(0.1, 0.4)
    assert schedule.ratios(0.05, 0.7, 0.4) == (1.0, 1.0)
    token, attention = schedule.ratios(0.3, 0.7, 0.4)
    assert token == pytest.approx(0.7 + 0.3 * 0.5) and attention == pytest.approx(0.4 + 0.6 * 0.5)
    assert schedule.ratios(0.6, 0.7, 0.4) == pytest.approx((0.7, 0.4))
    assert schedule.ratios(1.0, 0.7, 0.4) == pytest.approx((0.7, 0.4))


@pytest.mark.parametrize("method", ["forgetting", "infobatch_fixed_size"])
def test_stop_and_resume_matches_an_uninterrupted_run(tmp_path, method):
    data = with_tiny_transform(tiny_image_dataset(64), train=False)
    common = dict(save_strategy="steps", save_steps=8, example_pruning=method)

    full = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "full", **common), train_dataset=data)
    full.train()

    interrupted = TriLevelTrainer(
        model=tiny_sparse_vit(), args=arguments(tmp_path / "resumed", **common), train_dataset=data,
        callbacks=[StopAt(8)],
    )
    interrupted.train()
    assert interrupted.state.global_step == 8
    checkpoint = tmp_path / "resumed" / "checkpoint-8"
    assert (checkpoint / "example_pruning.safetensors").exists() and (checkpoint / "example_pruning.json").exists()

    resumed = TriLevelTrainer(
        model=tiny_sparse_vit(seed=123), args=arguments(tmp_path / "resumed", **common), train_dataset=data
    )
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == full.state.global_step == 18
    assert torch.equal(resumed.example_pruner.active_mask(), full.example_pruner.active_mask())
    assert torch.equal(
        resumed.example_pruner.epoch_indices(resumed.example_pruner.current_epoch),
        full.example_pruner.epoch_indices(full.example_pruner.current_epoch),
    )
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_from_a_checkpoint_without_pruning_state_names_the_file(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(64), train=False)
    args = arguments(tmp_path, save_strategy="steps", save_steps=6, num_train_epochs=1)
    TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data).train()
    os.remove(tmp_path / "checkpoint-6" / "example_pruning.json")
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    with pytest.raises(Exception, match="example_pruning"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_example_level_works_with_hf_vit_and_sparsity_needs_sparse_vit(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(32))
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  image_size=8, patch_size=4, num_channels=1, num_labels=4)
    )
    with pytest.raises(ValueError, match="from_vit"):
        TriLevelTrainer(model=vit, args=arguments(tmp_path), train_dataset=data)
    args = arguments(tmp_path, token_keep_ratio=1.0, attention_keep_ratio=1.0, example_pruning="random",
                     num_train_epochs=2)
    trainer = TriLevelTrainer(model=vit, args=args, train_dataset=data)
    trainer.train()
    assert trainer.state.global_step == 2 * math.ceil(24 / 8)


def test_evaluation_runs_on_a_with_transform_eval_set(tmp_path):
    data = tiny_image_dataset(48)
    trainer = TriLevelTrainer(
        model=tiny_sparse_vit(),
        args=arguments(tmp_path, num_train_epochs=1, eval_strategy="no", per_device_eval_batch_size=16),
        train_dataset=with_tiny_transform(data),
        eval_dataset=with_tiny_transform(data, train=False),
    )
    trainer.train()
    trainer.model.set_sparsity(token_keep_ratio=1.0)
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and math.isfinite(metrics["eval_loss"])
    assert trainer.model.get_sparsity()["token_keep_ratio"] == 0.5  # evaluation uses the final ratio


BAD_ARGUMENTS = [
    ({"example_pruning": "loss"}, "example_pruning"),
    ({"example_inactive_fraction": 1.0}, "example_inactive_fraction"),
    ({"example_inactive_fraction": 0.0}, "example_inactive_fraction"),
    ({"example_refresh_fraction": 0.0}, "example_refresh_fraction"),
    ({"example_swap_fraction": -0.1}, "example_swap_fraction"),
    ({"example_tie_break": "index"}, "example_tie_break"),
    ({"infobatch_prune_ratio": 1.0}, "infobatch_prune_ratio"),
    ({"token_keep_ratio": 0.0}, "token_keep_ratio"),
    ({"attention_keep_ratio": 2}, "attention_keep_ratio"),
    ({"sparsity_warmup_fraction": 0.7, "sparsity_decay_fraction": 0.5}, "sparsity_warmup_fraction"),
]


@pytest.mark.parametrize("overrides,field", BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        arguments(tmp_path, **overrides)


def test_saved_pruning_state_loads_without_pickle(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(64))
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path, num_train_epochs=1), train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    reloaded = load_example_pruner(tmp_path / "final")
    assert torch.equal(reloaded.active_mask(), trainer.example_pruner.active_mask())


# --- no host sync between forward and backward -------------------------------------------------------------------

@pytest.mark.parametrize("method,accumulation", [("forgetting", 1), ("infobatch_fixed_size", 2)])
def test_no_host_copy_between_forward_and_backward(tmp_path, method, accumulation):
    # The benchmark's counter (`hf-sparse bench gpu` runs the same check on a GPU): `.cpu()`, `.item()`, `bool()` ...
    # and, as this machine has no accelerator, `.to("cpu")` too.
    from hf_sparse.experiments.bench_gpu import HostCopyCounter

    data = with_tiny_transform(tiny_image_dataset(32), train=False)
    # infobatch_fixed_size: the second epoch trains with loss weights (the first is a uniform subset; no tail)
    args = arguments(tmp_path, example_pruning=method, num_train_epochs=2, example_refresh_fraction=0.5,
                     infobatch_tail_fraction=0.0, gradient_accumulation_steps=accumulation, logging_steps=1)
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data)
    counter = HostCopyCounter(explicit_host_targets=True)
    counter.watch_training_steps(trainer)
    with counter:
        trainer.train()
    # 24 active examples per epoch in micro-batches of 8: 3 forwards and backwards per epoch
    assert counter.windows == 2 * 3
    assert dict(counter.calls) == {}
    # the statistics still reached the pruner: every micro-batch of both epochs, before the second was planned
    pruner = trainer.example_pruner
    assert pruner.num_pending == 0
    assert pruner.samples_recorded == trainer.samples_seen == 2 * 24
    assert int(pruner.presentations.sum()) == (24 if method == "forgetting" else 2 * 24)  # forgetting: reset at refresh
    if method == "infobatch_fixed_size":
        assert pruner.summary()["mean_loss_weight"] > 1.0  # the kept low-loss examples were up-weighted
    else:
        assert pruner.num_refreshes == 1
