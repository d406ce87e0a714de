"""Example-level pruning: planned epoch sizes, determinism, forgetting statistics, refresh, InfoBatch at a fixed
epoch size, state round trip, validation, the sampler under accelerate-style sharding (InfoBatch itself:
test_infobatch.py)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import BatchSampler

from hf_sparse.tri_level import (
    EXAMPLE_PRUNERS,
    ExamplePruningSampler,
    ForgettingExamplePruner,
    build_example_pruner,
    load_example_pruner,
    plan_refresh_epochs,
)
from hf_sparse.tri_level.example_pruning import InfoBatchFixedSizeExamplePruner
from hf_sparse.tri_level.example_pruning.deferred import (
    CORRECT_COLUMN,
    INDEX_COLUMN,
    LOSS_COLUMN,
    NUM_STATISTICS,
    VARIANCE_COLUMN,
    DeferredRecords,
    _PendingRecord,
    pack_statistics,
)

METHOD_FIELDS = {
    "forgetting": {"inactive_fraction": 0.2, "swap_fraction": 0.05},
    "infobatch": {},
    "infobatch_fixed_size": {"inactive_fraction": 0.2},
    "random": {"inactive_fraction": 0.2},
    "none": {},
}
FIXED_SIZE_METHODS = sorted(name for name, pruner in EXAMPLE_PRUNERS.items() if pruner.fixed_epoch_size)


def _run_epoch(pruner, epoch: int, generator: torch.Generator) -> torch.Tensor:
    """Plan an epoch and record random outcomes for it in batches of 64."""
    order = pruner.epoch_indices(epoch)
    for batch in order.split(64):
        correct = torch.rand(batch.numel(), generator=generator) < 0.7
        loss = torch.rand(batch.numel(), generator=generator)
        variance = torch.rand(batch.numel(), generator=generator)
        pruner.record(batch, correct, loss, variance)
    return order


# ---- planning ------------------------------------------------------------------------------------
def test_plan_refresh_epochs_matches_paper():
    assert plan_refresh_epochs(300) == [30, 60, 90, 120, 150]
    assert plan_refresh_epochs(10) == [1, 2, 3, 4, 5]
    assert plan_refresh_epochs(30, period_fraction=0.2, last_fraction=1.0) == [6, 12, 18, 24]
    assert plan_refresh_epochs(1) == []


@pytest.mark.parametrize("method", FIXED_SIZE_METHODS)
def test_epoch_size_is_constant_and_indices_valid(method):
    pruner = build_example_pruner(method, 503, num_epochs=8, seed=1, **METHOD_FIELDS[method])
    expected = 503 if method == "none" else 503 - round(0.2 * 503)
    assert pruner.epoch_size == expected == len(ExamplePruningSampler(pruner))
    generator = torch.Generator().manual_seed(0)
    for epoch in range(8):
        order = _run_epoch(pruner, epoch, generator)
        assert order.dtype == torch.long and order.shape == (expected,)
        assert order.unique().numel() == expected and int(order.min()) >= 0 and int(order.max()) < 503
        assert torch.equal(pruner.active_mask().nonzero().squeeze(1), order.sort().values)
        summary = pruner.summary()
        assert all(isinstance(value, float) for value in summary.values())


@pytest.mark.parametrize("method", sorted(EXAMPLE_PRUNERS))
def test_deterministic_for_a_seed_and_different_across_seeds(method):
    def orders(seed: int) -> list[torch.Tensor]:
        pruner = build_example_pruner(method, 400, num_epochs=6, seed=seed, **METHOD_FIELDS[method])
        generator = torch.Generator().manual_seed(123)  # same outcomes for both seeds
        return [_run_epoch(pruner, epoch, generator) for epoch in range(6)]

    first, again, other = orders(7), orders(7), orders(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[1])  # a new shuffle every epoch


def test_epoch_indices_is_idempotent_and_only_moves_forward():
    pruner = build_example_pruner("forgetting", 200, num_epochs=10, seed=0)
    first = pruner.epoch_indices(0)
    pruner.record(first[:50], torch.ones(50, dtype=torch.bool), torch.zeros(50))
    assert torch.equal(pruner.epoch_indices(0), first)  # records do not change the planned epoch
    pruner.epoch_indices(2)
    with pytest.raises(ValueError, match="only moves forward"):
        pruner.epoch_indices(1)


def test_skipping_epochs_equals_stepping_through_them():
    stepped = build_example_pruner("forgetting", 300, num_epochs=10, seed=3)
    jumped = build_example_pruner("forgetting", 300, num_epochs=10, seed=3)
    generator = torch.Generator().manual_seed(0)
    _run_epoch(stepped, 0, generator)
    generator = torch.Generator().manual_seed(0)
    _run_epoch(jumped, 0, generator)
    for epoch in (1, 2):
        stepped.epoch_indices(epoch)
    assert torch.equal(stepped.epoch_indices(3), jumped.epoch_indices(3))
    assert stepped.num_refreshes == jumped.num_refreshes == 3


# ---- statistics ----------------------------------------------------------------------------------
def test_forgetting_counts_on_a_hand_made_sequence():
    pruner = ForgettingExamplePruner(10, inactive_fraction=0.2, seed=0)
    sequence = {  # example -> correctness at each presentation
        0: [True, False, True, False],  # forgotten twice
        1: [False, True, True],  # learnt, never forgotten
        2: [True, False, False],  # forgotten once
        3: [False, False],  # never correct
    }
    for step in range(4):
        batch = [example for example, outcomes in sequence.items() if step < len(outcomes)]
        correct = torch.tensor([sequence[example][step] for example in batch])
        pruner.record(torch.tensor(batch), correct, torch.full((len(batch),), float(step)))
    assert pruner.forgetting_count[:5].tolist() == [2, 0, 1, 0, 0]
    assert pruner.ever_correct[:5].tolist() == [True, True, True, False, False]
    assert pruner.presentations[:5].tolist() == [4, 3, 3, 2, 0]
    assert pruner.last_correct[:5].tolist() == [0, 1, 0, 0, -1]  # -1: never seen
    assert pruner.last_loss[:4].tolist() == [3.0, 2.0, 2.0, 1.0] and pruner.last_loss[4] == float("inf")
    assert torch.isnan(pruner.cls_attention_variance).all()  # never given


def test_record_is_vectorised_fast_and_matches_a_loop():
    num_examples, batch_size = 60_000, 10_000
    pruner = ForgettingExamplePruner(num_examples, seed=0)
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(12):
        indices = torch.randperm(num_examples, generator=generator)[:batch_size]
        batches.append(
            (indices, torch.rand(batch_size, generator=generator) < 0.6, torch.rand(batch_size, generator=generator))
        )
    start = time.perf_counter()
    for indices, correct, loss in batches:
        pruner.record(indices, correct, loss, loss * 2)
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, f"record() took {elapsed:.2f} s for 12 batches of 10k"  # ~10 ms here

    # Reference: a per-sample Python loop (what the reference implementation does).
    last = [-1] * num_examples
    forgetting = [0] * num_examples
    for indices, correct, _ in batches:
        for index, right in zip(indices.tolist(), correct.tolist(), strict=True):
            forgetting[index] += last[index] == 1 and not right
            last[index] = int(right)
    assert pruner.forgetting_count.tolist() == forgetting
    assert pruner.last_correct.tolist() == last
    assert torch.equal(pruner.cls_attention_variance[batches[-1][0]], batches[-1][2] * 2)


def test_record_counts_duplicates_once_and_validates():
    pruner = ForgettingExamplePruner(10, seed=0)
    # accelerate pads an uneven last batch by repeating samples: one presentation, first values.
    pruner.record(torch.tensor([1, 2, 1]), torch.tensor([True, False, False]), torch.tensor([0.1, 0.2, 0.9]))
    assert pruner.presentations[1] == 1 and pruner.last_correct[1] == 1
    assert pruner.last_loss[1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="same number"):
        pruner.record(torch.tensor([1, 2]), torch.tensor([True]), torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="indices"):
        pruner.record(torch.tensor([10]), torch.tensor([True]), torch.tensor([0.1]))
    pruner.record(torch.tensor([3]), torch.tensor([True]), torch.tensor([float("nan")]))
    assert pruner.last_loss[3] == float("inf")  # NaN loss: unknown, treated as hard


def test_record_async_is_applied_in_order_before_anything_reads_the_statistics(monkeypatch):
    # Copies still in flight (as on an accelerator): nothing is applied until a reader needs the statistics.
    monkeypatch.setattr(_PendingRecord, "ready", lambda self: False)
    direct, deferred = (ForgettingExamplePruner(40, seed=0, refresh_epochs=[1], swap_fraction=0.1) for _ in range(2))
    generator = torch.Generator().manual_seed(0)
    order = direct.epoch_indices(0)
    assert torch.equal(deferred.epoch_indices(0), order)
    batches = [
        (batch, torch.rand(batch.numel(), generator=generator) < 0.5, torch.rand(batch.numel(), generator=generator),
         None if position == 0 else torch.rand(batch.numel(), generator=generator))
        for position, batch in enumerate(order.split(8))
    ]
    for batch in batches:
        direct.record(*batch)
        deferred.record_async(*batch)
    assert deferred.num_pending == len(batches) and int(deferred.presentations.sum()) == 0
    # record() applies the queued batches first: the order decides the forgetting transitions
    again = (order[:8], torch.zeros(8, dtype=torch.bool), torch.ones(8))
    direct.record(*again)
    deferred.record(*again)
    assert deferred.num_pending == 0
    for batch in batches[:2]:
        direct.record_async(*batch)
        deferred.record_async(*batch)
    # the refresh before epoch 1 sees every batch: the same examples swapped, the same state
    assert torch.equal(deferred.epoch_indices(1), direct.epoch_indices(1))
    assert deferred.num_pending == direct.num_pending == 0
    expected, actual = direct.state_dict(), deferred.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if torch.is_tensor(value):
            torch.testing.assert_close(actual[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
        else:
            assert actual[key] == value, key


def test_queued_records_reach_every_save_and_a_load_replaces_them(monkeypatch, tmp_path):
    monkeypatch.setattr(_PendingRecord, "ready", lambda self: False)
    pruner = build_example_pruner("infobatch_fixed_size", 20, num_epochs=4, seed=0, inactive_fraction=0.2)
    order = pruner.epoch_indices(0)
    pruner.record_async(order, torch.ones(16, dtype=torch.bool), torch.arange(16.0))
    pruner.save(tmp_path)
    assert pruner.num_pending == 0 and load_example_pruner(tmp_path).samples_recorded == 16
    pruner.record_async(order, torch.ones(16, dtype=torch.bool), torch.arange(16.0))
    pruner.load(tmp_path)  # the saved state replaces what was recorded after it
    assert pruner.num_pending == 0 and pruner.samples_recorded == 16


def test_packed_statistics_have_one_layout_and_the_queue_applies_them_unchanged(monkeypatch):
    # The trainer packs once (pack_statistics) and the pruner takes the packed tensor as it is: named columns, float64
    # (an index above 2**24, where float32 would round it, survives), a missing variance is NaN and ignored.
    indices, correct = torch.tensor([2**24 + 1, 3]), torch.tensor([True, False])
    loss, variance = torch.tensor([0.5, 1.5]), torch.tensor([0.25, 0.75])
    packed = pack_statistics(indices, correct, loss, variance)
    assert packed.dtype == torch.float64 and packed.shape == (2, NUM_STATISTICS)
    assert packed[:, INDEX_COLUMN].long().tolist() == indices.tolist()
    assert packed[:, CORRECT_COLUMN].tolist() == [1.0, 0.0]
    assert packed[:, LOSS_COLUMN].tolist() == loss.tolist() and packed[:, VARIANCE_COLUMN].tolist() == variance.tolist()
    assert pack_statistics(indices, correct, loss)[:, VARIANCE_COLUMN].isnan().all()

    monkeypatch.setattr(_PendingRecord, "ready", lambda self: False)  # copies in flight: applied only by flush
    received = []
    queue = DeferredRecords(lambda *columns: received.append(columns))
    queue.push(packed, has_variance=True)
    queue.push(pack_statistics(indices, correct, loss), has_variance=False)
    assert len(queue) == 2 and not received
    queue.flush()
    assert len(queue) == 0 and [columns[3] is None for columns in received] == [False, True]
    got_indices, got_correct, got_loss, got_variance = received[0]
    assert got_indices.long().tolist() == indices.tolist() and got_correct.tolist() == correct.tolist()
    assert got_loss.tolist() == loss.tolist() and got_variance.tolist() == variance.tolist()
    with pytest.raises(ValueError, match="float64 of shape"):
        queue.push(packed.float(), has_variance=True)
    with pytest.raises(ValueError, match="float64 of shape"):
        queue.push(packed[:, :3], has_variance=True)


def test_record_packed_async_equals_record():
    direct, packed = (ForgettingExamplePruner(40, seed=0, swap_fraction=0.1) for _ in range(2))
    order = direct.epoch_indices(0)
    packed.epoch_indices(0)
    generator = torch.Generator().manual_seed(1)
    for position, batch in enumerate(order.split(8)):
        correct = torch.rand(batch.numel(), generator=generator) < 0.5
        loss, variance = torch.rand(batch.numel(), generator=generator), torch.rand(batch.numel(), generator=generator)
        variance = None if position % 2 else variance
        direct.record(batch, correct, loss, variance)
        packed.record_packed_async(pack_statistics(batch, correct, loss, variance), has_variance=variance is not None)
    packed.flush()
    for key, value in direct.state_dict().items():
        if torch.is_tensor(value):
            torch.testing.assert_close(packed.state_dict()[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_loss_weights_stay_on_the_device_and_follow_each_epochs_table():
    pruner = _infobatch_with_losses()
    everyone = torch.arange(100)
    for epoch in (1, 2):
        pruner.epoch_indices(epoch)
        table = pruner.state_dict()["epoch_weights"]
        assert torch.equal(pruner.loss_weights(everyone), table)  # a new epoch's table replaces the device copy
        pruner.record(everyone, torch.ones(100, dtype=torch.bool), torch.rand(100))
    # A device whose memory the host cannot read (meta): any copy of the indices to the host would raise.
    weights = pruner.loss_weights(everyone.to("meta"))
    assert weights.device.type == "meta" and weights.shape == (100,) and weights.dtype == torch.float32


# ---- forgetting refresh ------------------------------------------------------------------------
def _hand_made_forgetting(tie_break: str = "cls_attention_variance", seed: int = 0) -> ForgettingExamplePruner:
    """20 examples, 4 inactive, swap 2, refresh before epoch 1; every active example seen."""
    pruner = ForgettingExamplePruner(
        20, inactive_fraction=0.2, seed=seed, refresh_epochs=[1], swap_fraction=0.1, tie_break=tie_break
    )
    pruner.epoch_indices(0)
    active = pruner.active.nonzero().squeeze(1)
    pruner.presentations[active] = 3
    pruner.ever_correct[active] = True
    pruner.forgetting_count[active] = 2
    return pruner


def test_refresh_removes_the_least_forgotten_and_restores_from_the_pool():
    pruner = _hand_made_forgetting()
    active = pruner.active.nonzero().squeeze(1)
    easy = active[[5, 11]]
    pruner.forgetting_count[easy] = 0  # least forgotten
    never = active[0]  # count 0 but never correct: the hardest, must stay
    pruner.forgetting_count[never] = 0
    pruner.ever_correct[never] = False
    unseen = active[1]  # not presented since the last refresh: unknown, must stay
    pruner.presentations[unseen] = 0
    pruner.forgetting_count[unseen] = 0
    old_active, old_pool = pruner.active.clone(), (~pruner.active).nonzero().squeeze(1)

    order = pruner.epoch_indices(1)  # applies the refresh first
    removed = (old_active & ~pruner.active).nonzero().squeeze(1)
    restored = (~old_active & pruner.active).nonzero().squeeze(1)
    assert removed.sort().values.tolist() == easy.sort().values.tolist()
    assert restored.numel() == 2 and set(restored.tolist()) <= set(old_pool.tolist())
    assert bool(pruner.active[never]) and bool(pruner.active[unseen])
    assert int(pruner.active.sum()) == pruner.epoch_size == order.numel()
    assert set(order.tolist()) == set(pruner.active.nonzero().squeeze(1).tolist())
    assert pruner.num_refreshes == 1
    # Window statistics reset; the last outcome survives to count the next transition.
    assert int(pruner.presentations.sum()) == 0 and int(pruner.forgetting_count.sum()) == 0
    assert not bool(pruner.ever_correct.any())


def test_refresh_ties_broken_by_cls_attention_variance():
    pruner = _hand_made_forgetting("cls_attention_variance")
    active = pruner.active.nonzero().squeeze(1)
    pruner.forgetting_count[active] = 0  # all tied
    pruner.cls_attention_variance[active] = torch.linspace(1.0, 2.0, active.numel())
    low = active[[7, 12]]
    pruner.cls_attention_variance[low] = torch.tensor([0.1, 0.2])
    pruner.cls_attention_variance[active[0]] = float("nan")  # unknown variance is removed last
    removed, restored = pruner.refresh(1)
    assert sorted(removed.tolist()) == sorted(low.tolist())
    assert restored.numel() == 2


def test_random_tie_break_is_seeded_and_not_index_order():
    removed_sets = []
    for seed in range(6):
        pruner = _hand_made_forgetting("random", seed=seed)
        active = pruner.active.nonzero().squeeze(1)
        pruner.forgetting_count[active] = 0
        removed, _ = pruner.refresh(1)
        again = _hand_made_forgetting("random", seed=seed)
        again.forgetting_count[again.active] = 0
        assert torch.equal(again.refresh(1)[0], removed)  # deterministic for a seed
        removed_sets.append(tuple(sorted(removed.tolist())))
        lowest = tuple(active[:2].tolist())
    assert len(set(removed_sets)) > 1
    assert removed_sets.count(lowest) < len(removed_sets)  # not simply the lowest indices


# ---- InfoBatch at a fixed epoch size ---------------------------------------------------------------
def _infobatch_with_losses(prune_ratio: float = 0.5, num_epochs: int = 8) -> InfoBatchFixedSizeExamplePruner:
    pruner = InfoBatchFixedSizeExamplePruner(
        100, inactive_fraction=0.2, seed=0, num_epochs=num_epochs, prune_ratio=prune_ratio
    )
    pruner.epoch_indices(0)
    everyone = torch.arange(100)
    pruner.record(everyone, torch.ones(100, dtype=torch.bool), everyone.float())  # loss of i is i
    return pruner


@pytest.mark.parametrize(("prune_ratio", "smallest_pool", "pool_size"), [(0.5, 40, 50), (0.8, 25, 50), (0.2, 100, 100)])
def test_infobatch_fixed_size_pool_drop_count_and_unbiased_weights(prune_ratio, smallest_pool, pool_size):
    # losses 0..99: the below-mean pool is 0..49, widened to ceil(20 / prune_ratio) when that is larger
    pruner = _infobatch_with_losses(prune_ratio)
    assert pruner.pool_size == smallest_pool
    order = pruner.epoch_indices(1)
    dropped = sorted(set(range(100)) - set(order.tolist()))
    assert len(dropped) == 20 and max(dropped) < pool_size  # k = 20 dropped, all from the lowest losses
    weights = pruner.loss_weights(torch.arange(100))
    kept_pool = [i for i in range(pool_size) if i not in dropped]
    if kept_pool:
        assert torch.allclose(weights[kept_pool], torch.tensor(1 / (1 - 20 / pool_size)))
    assert torch.equal(weights[pool_size:], torch.ones(100 - pool_size))
    # Expected contribution of a pool member: P(kept) * weight = 1 (unbiased).
    if kept_pool:
        assert (1 - 20 / pool_size) * float(weights[kept_pool[0]]) == pytest.approx(1.0)


def test_infobatch_fixed_size_unseen_examples_never_in_pool_and_tail_is_uniform():
    pruner = InfoBatchFixedSizeExamplePruner(100, inactive_fraction=0.2, seed=0, num_epochs=8)
    assert pruner.loss_weights(torch.arange(5)).tolist() == [1.0] * 5
    first = pruner.epoch_indices(0)
    assert pruner.summary()["mean_loss_weight"] == 1.0
    pruner.record(first, torch.ones(80, dtype=torch.bool), torch.zeros(80))  # 20 never seen: loss +inf
    order = pruner.epoch_indices(1)
    unseen = sorted(set(range(100)) - set(first.tolist()))
    assert set(unseen) <= set(order.tolist())  # +inf loss: never in the pool, never dropped
    assert torch.equal(pruner.loss_weights(torch.tensor(unseen)), torch.ones(20))
    # Tail: epoch >= (1 - 0.125) * 8 = 7 is a uniform subset with unit weights.
    assert not pruner.in_tail(6) and pruner.in_tail(7)
    pruner.epoch_indices(7)
    assert torch.equal(pruner.loss_weights(torch.arange(100)), torch.ones(100))
    assert pruner.epoch_indices(7).numel() == 80


def test_infobatch_fixed_size_falls_back_to_uniform_without_losses():
    pruner = InfoBatchFixedSizeExamplePruner(100, inactive_fraction=0.2, seed=0, num_epochs=8)
    assert pruner.epoch_indices(1).numel() == 80  # nothing recorded: no pool, uniform subset
    assert torch.equal(pruner.loss_weights(torch.arange(100)), torch.ones(100))


# ---- state ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(EXAMPLE_PRUNERS))
def test_state_round_trip_mid_run_gives_identical_epochs(method, tmp_path):
    def make():
        return build_example_pruner(method, 300, num_epochs=8, seed=5, **METHOD_FIELDS[method])

    original = make()
    generator = torch.Generator().manual_seed(0)
    for epoch in range(2):
        _run_epoch(original, epoch, generator)
    # Mid-epoch 2: half of it recorded, then a checkpoint.
    order = original.epoch_indices(2)
    half = order[: order.numel() // 2]
    original.record(
        half, torch.rand(half.numel(), generator=generator) < 0.5, torch.rand(half.numel(), generator=generator)
    )
    original.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["example_pruning.json", "example_pruning.safetensors"]
    saved = json.loads((tmp_path / "example_pruning.json").read_text())
    assert saved["method"] == method and saved["state"]["epoch"] == 2
    assert set(load_file(str(tmp_path / "example_pruning.safetensors"))) >= {"last_loss", "epoch_order"}

    resumed_into = make()
    resumed_into.load(tmp_path)
    rebuilt = load_example_pruner(tmp_path)
    assert type(rebuilt) is type(original) and rebuilt.config() == original.config()
    copies = [resumed_into, rebuilt]
    for copy in copies:
        assert torch.equal(copy.epoch_indices(2), order)  # same order for the interrupted epoch
    rest = order[order.numel() // 2 :]
    continuation = torch.Generator().manual_seed(1)
    outcomes = (
        torch.rand(rest.numel(), generator=continuation) < 0.5,
        torch.rand(rest.numel(), generator=continuation),
    )
    for pruner in [original, *copies]:
        pruner.record(rest, *outcomes)
    for epoch in range(3, 8):
        expected = original.epoch_indices(epoch)
        weights = original.loss_weights(torch.arange(300))
        for copy in copies:
            assert torch.equal(copy.epoch_indices(epoch), expected)
            assert torch.equal(copy.loss_weights(torch.arange(300)), weights)
        generator_state = torch.Generator().manual_seed(epoch)
        outcomes = (
            torch.rand(expected.numel(), generator=generator_state) < 0.5,
            torch.rand(expected.numel(), generator=generator_state),
        )
        for pruner in [original, *copies]:
            pruner.record(expected, *outcomes)
    assert original.summary() == rebuilt.summary()


def test_load_state_dict_rejects_another_identity():
    state = build_example_pruner("random", 100, num_epochs=2, seed=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_example_pruner("random", 100, num_epochs=2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="method"):
        build_example_pruner("infobatch", 100, num_epochs=2, seed=0).load_state_dict(state)


# ---- validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "fields", "name"),
    [
        ("random", {"inactive_fraction": 1.0}, "inactive_fraction"),
        ("random", {"inactive_fraction": -0.1}, "inactive_fraction"),
        ("random", {"inactive_fraction": "0.2"}, "inactive_fraction"),
        ("none", {"inactive_fraction": 0.2}, "inactive_fraction"),
        ("forgetting", {"swap_fraction": 0.5}, "swap_fraction"),
        ("forgetting", {"swap_fraction": -0.01}, "swap_fraction"),
        ("forgetting", {"tie_break": "index"}, "tie_break"),
        ("forgetting", {"refresh_epochs": [0, 3]}, "refresh_epochs"),
        ("forgetting", {"refresh_epochs": "3"}, "refresh_epochs"),
        ("forgetting", {"refresh_period_fraction": 0.0}, "period_fraction"),
        ("infobatch_fixed_size", {"prune_ratio": 0.0}, "prune_ratio"),
        ("infobatch_fixed_size", {"prune_ratio": 1.5}, "prune_ratio"),
        ("infobatch_fixed_size", {"tail_fraction": 1.0}, "tail_fraction"),
        ("infobatch", {"prune_ratio": 1.0}, "prune_ratio"),
        ("infobatch", {"delta": 1.5}, "delta"),
        ("infobatch", {"inactive_fraction": 0.2}, "inactive_fraction"),
        ("infobatch", {"tail_fraction": 0.1}, "tail_fraction"),
        ("random", {"swap_fraction": 0.1}, "swap_fraction"),
        ("dropout", {}, "example_pruning"),
    ],
)
def test_bad_fields_raise_value_error_naming_them(method, fields, name):
    with pytest.raises(ValueError, match=name):
        build_example_pruner(method, 100, num_epochs=10, seed=0, **fields)


@pytest.mark.parametrize(
    ("arguments", "name"),
    [({"num_examples": 0}, "num_examples"), ({"seed": 1.5}, "seed"), ({"num_epochs": 0}, "num_epochs")],
)
def test_bad_core_arguments(arguments, name):
    kwargs = {"method": "random", "num_examples": 10, "num_epochs": 2, "seed": 0, **arguments}
    with pytest.raises(ValueError, match=name):
        build_example_pruner(kwargs.pop("method"), kwargs.pop("num_examples"), **kwargs)


def test_unknown_method_lists_allowed_values():
    with pytest.raises(ValueError, match="example_pruning") as error:
        build_example_pruner("dropout", 10, num_epochs=1, seed=0)
    for name in EXAMPLE_PRUNERS:
        assert name in str(error.value)


# ---- sampler -------------------------------------------------------------------------------------
def test_sampler_follows_set_epoch_and_advances_by_itself():
    pruner = build_example_pruner("random", 50, num_epochs=4, seed=0)
    sampler = ExamplePruningSampler(pruner)
    first = list(sampler)
    assert len(first) == len(sampler) == 40 and first == pruner.epoch_indices(0).tolist()
    second = list(sampler)  # a completed pass moved to epoch 1
    assert second == pruner.epoch_indices(1).tolist() != first
    sampler.set_epoch(3)
    assert list(sampler) == pruner.epoch_indices(3).tolist()


def test_sampler_sharded_like_accelerate_covers_the_epoch_once():
    accelerate = pytest.importorskip("accelerate.data_loader")
    ranks = []
    # 160 examples -> 128 per epoch = 16 batches of 8: no padding by repetition at the end.
    for process_index in range(2):  # each process has its own, identically seeded pruner
        pruner = build_example_pruner("forgetting", 160, num_epochs=10, seed=4)
        sampler = ExamplePruningSampler(pruner)
        sampler.set_epoch(0)
        shard = accelerate.BatchSamplerShard(
            BatchSampler(sampler, batch_size=8, drop_last=False), num_processes=2, process_index=process_index
        )
        ranks.append([index for batch in shard for index in batch])
    expected = build_example_pruner("forgetting", 160, num_epochs=10, seed=4).epoch_indices(0).tolist()
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(expected)
