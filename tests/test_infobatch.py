"""`example_pruning="infobatch"`: InfoBatch as its paper and code define it, replayed against an independent
computation of the algorithm, and driven by TriLevelTrainer (planned steps, learning rate, resume)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from hf_sparse import TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.tri_level import ExamplePruningSampler, build_example_pruner, load_example_pruner
from hf_sparse.tri_level.example_pruning import InfoBatchExamplePruner, InfoBatchFixedSizeExamplePruner
from hf_sparse.tri_level.trainer import epoch_position, epoch_progress

from tri_level_helpers import StopAt, tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

NUM_EXAMPLES, NUM_EPOCHS = 40, 8


def loss_sequence(num_epochs: int = NUM_EPOCHS, num_examples: int = NUM_EXAMPLES) -> np.ndarray:
    """A fixed loss for every (epoch, example): decreasing over the epochs, spread within each."""
    rng = np.random.default_rng(2024)
    return rng.gamma(2.0, 1.0, (num_epochs, num_examples)) / (1.0 + np.arange(num_epochs))[:, None]


# ---- replay against the algorithm ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("prune_ratio", "kept_share"), [(0.5, (1, 2)), (0.3, (7, 10))])
def test_replayed_losses_give_the_algorithms_epochs_and_weights(prune_ratio, kept_share):
    pruner = build_example_pruner("infobatch", NUM_EXAMPLES, num_epochs=NUM_EPOCHS, seed=3, prune_ratio=prune_ratio)
    losses = loss_sequence()
    # The algorithm, computed here: scores are the last loss of each example (NaN before its first), the pool the
    # examples below the mean of the known scores, floor(kept_share * |pool|) of it kept (exact integer arithmetic),
    # pruning in the first floor(0.875 * 8) = 7 epochs only.
    scores = np.full(NUM_EXAMPLES, np.nan)
    sizes = []
    for epoch in range(NUM_EPOCHS):
        order = pruner.epoch_indices(epoch).tolist()
        weights = pruner.loss_weights(torch.arange(NUM_EXAMPLES))
        known = ~np.isnan(scores)
        pool = set(np.flatnonzero(known & (scores < np.nanmean(scores)))) if epoch < 7 and known.any() else set()
        kept_count = (kept_share[0] * len(pool)) // kept_share[1]
        dropped = set(range(NUM_EXAMPLES)) - set(order)
        assert len(order) == len(set(order)) == NUM_EXAMPLES - len(dropped)
        assert dropped <= pool and len(dropped) == len(pool) - kept_count  # only well-learned examples are left out
        expected_weights = torch.ones(NUM_EXAMPLES)
        expected_weights[sorted(pool - dropped)] = 1 / (1 - prune_ratio)
        assert torch.allclose(weights, expected_weights)
        sizes.append(len(order))
        assert pruner.epoch_size == len(order) == len(ExamplePruningSampler(pruner))
        for batch in torch.tensor(order).split(16):  # train: the examples of this epoch get this epoch's loss
            batch_losses = losses[epoch][batch.numpy()]
            pruner.record(batch, torch.ones(batch.numel(), dtype=torch.bool), torch.from_numpy(batch_losses))
            scores[batch.numpy()] = batch_losses.astype(np.float32)  # the pruner keeps float32 losses
    # every example in the first epoch (scores start equal) and in the last (1 - delta of the epochs); fewer between
    assert sizes[0] == sizes[-1] == NUM_EXAMPLES and all(size < NUM_EXAMPLES for size in sizes[1:-1])
    assert pruner.epoch_sizes == sizes
    assert pruner.summary()["examples_pruned"] == NUM_EXAMPLES * NUM_EPOCHS - sum(sizes)


def test_same_losses_same_epochs_and_the_seed_draws_them():
    def epochs(seed: int) -> list[list[int]]:
        pruner = build_example_pruner("infobatch", NUM_EXAMPLES, num_epochs=NUM_EPOCHS, seed=seed)
        orders = []
        for epoch, losses in enumerate(loss_sequence()):
            order = pruner.epoch_indices(epoch)
            pruner.record(order, torch.ones(order.numel(), dtype=torch.bool), torch.from_numpy(losses[order.numpy()]))
            orders.append(order.tolist())
        return orders

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert first == again
    assert first != other and [len(order) for order in first[:2]] == [len(order) for order in other[:2]]


@pytest.mark.parametrize(("num_epochs", "delta", "pruning"), [(8, 0.875, 7), (10, 0.875, 8), (2, 0.875, 1),
                                                               (4, 1.0, 4), (4, 0.0, 0)])
def test_the_first_floor_delta_epochs_prune(num_epochs, delta, pruning):
    # upstream: its epoch counter (one ahead of the 0-based epoch) prunes while at most delta * num_epochs
    pruner = InfoBatchExamplePruner(10, num_epochs=num_epochs, delta=delta)
    assert pruner.num_pruning_epochs == pruning
    assert [pruner.prunes(epoch) for epoch in range(num_epochs)] == [epoch < pruning for epoch in range(num_epochs)]


def test_examples_without_a_loss_are_never_left_out():
    pruner = InfoBatchExamplePruner(20, num_epochs=8)
    first = pruner.epoch_indices(0)
    assert first.numel() == 20 and torch.equal(pruner.loss_weights(torch.arange(20)), torch.ones(20))
    loss = torch.arange(20.0)
    loss[3] = float("nan")
    pruner.record(first[first >= 2], torch.ones(18, dtype=torch.bool), loss[first[first >= 2]])  # 0 and 1 untrained
    order = set(pruner.epoch_indices(1).tolist())
    assert {0, 1, 3} <= order  # no loss (never trained, NaN): not in the pool
    assert set(range(20)) - order <= {2, *range(4, 11)}  # the pool: known losses below their mean (186 / 17)


# ---- state -------------------------------------------------------------------------------------------------------
def test_state_round_trip_keeps_epoch_sizes_and_steps(tmp_path):
    pruner = build_example_pruner("infobatch", NUM_EXAMPLES, num_epochs=NUM_EPOCHS, seed=0)
    for epoch, losses in enumerate(loss_sequence()[:3]):
        order = pruner.epoch_indices(epoch)
        pruner.note_optimizer_steps(epoch, math.ceil(order.numel() / 8))
        pruner.record(order, torch.ones(order.numel(), dtype=torch.bool), torch.from_numpy(losses[order.numpy()]))
    pruner.save(tmp_path)
    rebuilt = load_example_pruner(tmp_path)
    assert type(rebuilt) is InfoBatchExamplePruner and rebuilt.config() == pruner.config()
    assert rebuilt.epoch_sizes == pruner.epoch_sizes and rebuilt.epoch_size == pruner.epoch_size < NUM_EXAMPLES
    assert rebuilt.optimizer_steps_per_epoch == pruner.optimizer_steps_per_epoch
    assert torch.equal(rebuilt.epoch_indices(3), pruner.epoch_indices(3))


def test_a_state_saved_as_infobatch_before_format_2_is_the_fixed_size_mode(tmp_path):
    old = InfoBatchFixedSizeExamplePruner(50, inactive_fraction=0.2, num_epochs=4)
    old.epoch_indices(0)
    old.save(tmp_path)
    saved = json.loads((tmp_path / "example_pruning.json").read_text())
    saved["method"] = saved["state"]["method"] = "infobatch"  # what format 1 wrote for this mode
    saved["state"]["format_version"] = 1
    (tmp_path / "example_pruning.json").write_text(json.dumps(saved))
    tensors = load_file(str(tmp_path / "example_pruning.safetensors"))
    save_file({k: v for k, v in tensors.items() if k not in ("epoch_sizes", "optimizer_steps_per_epoch")},
              str(tmp_path / "example_pruning.safetensors"))
    assert type(load_example_pruner(tmp_path)) is InfoBatchFixedSizeExamplePruner
    with pytest.raises(ValueError, match="infobatch_fixed_size"):
        InfoBatchExamplePruner(50, num_epochs=4).load(tmp_path)


# ---- arguments -----------------------------------------------------------------------------------------------------
def arguments(output_dir, **overrides) -> TriLevelTrainingArguments:
    fields = dict(output_dir=str(output_dir), num_train_epochs=4, per_device_train_batch_size=8, learning_rate=3e-3,
                  lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                  example_pruning="infobatch", infobatch_delta=0.75, token_keep_ratio=1.0, attention_keep_ratio=1.0,
                  disable_tqdm=True)
    fields.update(overrides)
    return TriLevelTrainingArguments(**fields)


def test_infobatch_arguments_default_to_upstream_and_keep_each_field_to_its_mode(tmp_path):
    args = arguments(tmp_path, infobatch_delta=None)
    assert (args.infobatch_delta, args.infobatch_prune_ratio, args.example_inactive_fraction) == (0.875, 0.5, None)
    fixed = arguments(tmp_path, example_pruning="infobatch_fixed_size", infobatch_delta=None)
    assert (fixed.infobatch_tail_fraction, fixed.example_inactive_fraction) == (0.125, 0.2)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"example_inactive_fraction": 0.3}, "infobatch_fixed_size"),
    ({"infobatch_tail_fraction": 0.1}, "infobatch_delta"),
    ({"example_pruning": "infobatch_fixed_size"}, "infobatch_delta"),
    ({"infobatch_delta": 1.5}, "infobatch_delta"),
    ({"infobatch_prune_ratio": 1.0}, "infobatch_prune_ratio"),
    ({"max_steps": 10}, "num_train_epochs"),
    ({"num_train_epochs": 2.5}, "whole number"),
])
def test_bad_infobatch_arguments_say_what_to_do(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        arguments(tmp_path, **overrides)


def test_epoch_position_and_progress():
    steps = [6, 4, 5]
    assert [epoch_position(step, steps) for step in (0, 5, 6, 10, 14, 15)] == [
        (0, 0), (0, 5), (1, 0), (2, 0), (2, 4), (3, 0)]
    assert epoch_progress(8, steps, 4) == pytest.approx((1 + 2 / 4) / 4)
    assert epoch_progress(15, steps, 3) == 1.0


# ---- TriLevelTrainer ---------------------------------------------------------------------------------------------
class LearningRates(TrainerCallback):
    """The learning rate after every optimizer step (the one the next step uses) and at the end of every epoch."""

    def __init__(self):
        self.after_step, self.at_epoch_end = [], []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.after_step.append(optimizer.param_groups[0]["lr"])

    def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
        self.at_epoch_end.append(optimizer.param_groups[0]["lr"])


def test_trainer_runs_the_planned_steps_and_the_learning_rate_follows_the_epochs(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(48), train=False)
    rates = LearningRates()
    trainer = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path), train_dataset=data, callbacks=[rates])
    trainer.train()
    pruner = trainer.example_pruner
    sizes = pruner.epoch_sizes
    # delta 0.75 of 4 epochs: epochs 0 (no scores yet) and 3 train all 48; epochs 1 and 2 leave some out
    assert len(sizes) == 4 and sizes[0] == sizes[3] == 48 and max(sizes[1:3]) < 48
    planned = sum(math.ceil(size / 8) for size in sizes)
    assert trainer.state.global_step == trainer.state.max_steps == planned == sum(pruner.optimizer_steps_per_epoch)
    assert trainer.samples_seen == sum(sizes)
    # linear decay on the run's progress in epochs: 1 - (e + 1) / 4 of the initial rate after epoch e, 0 at the end
    assert rates.at_epoch_end == pytest.approx([3e-3 * (1 - (epoch + 1) / 4) for epoch in range(4)], abs=1e-12)
    assert rates.after_step[-1] == 0.0 and len(rates.after_step) == planned
    assert trainer.report_settings()["InfoBatch delta (share of the epochs that prune)"] == 0.75


def test_trainer_resumed_mid_run_repeats_the_epochs(tmp_path):
    data = with_tiny_transform(tiny_image_dataset(48), train=False)
    # micro-batches of 4, 2 per optimizer step: a full epoch is 12 batches, 6 steps; a pruned one fewer, often odd
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    full = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "full", **common), train_dataset=data)
    full.train()
    sizes, steps = full.example_pruner.epoch_sizes, full.example_pruner.optimizer_steps_per_epoch
    assert steps == [math.ceil(math.ceil(size / 4) / 2) for size in sizes] and steps[1] < steps[0] == 6
    stop = steps[0] + steps[1] + 1  # one step into the second pruned epoch
    # where the Trainer's own count (a full epoch's steps each) would have put the resumed run: elsewhere
    assert epoch_position(stop, steps) == (2, 1) != divmod(stop, steps[0])
    common["save_strategy"], common["save_steps"] = "steps", stop
    interrupted = TriLevelTrainer(model=tiny_sparse_vit(), args=arguments(tmp_path / "resumed", **common),
                                  train_dataset=data, callbacks=[StopAt(stop)])
    interrupted.train()
    assert interrupted.state.global_step == stop
    resumed = TriLevelTrainer(model=tiny_sparse_vit(seed=123), args=arguments(tmp_path / "resumed", **common),
                              train_dataset=data)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.example_pruner.epoch_sizes == sizes
    assert resumed.example_pruner.optimizer_steps_per_epoch == steps
    assert resumed.state.global_step == resumed.state.max_steps == full.state.global_step == sum(steps)
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr() == [0.0, 0.0]  # two param groups
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
