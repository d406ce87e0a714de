"""torch.compile over whole runs: the Tri-Level keep-ratio grid bounds the compiles, nothing falls back to eager, and
compiled logits match eager ones; both trainers run with `torch_compile=True` (CPU, backend `aot_eager`)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from hf_sparse import ToSTTrainer, ToSTTrainingArguments, TriLevelTrainer, TriLevelTrainingArguments
from hf_sparse.tost.masks import get_masks
from hf_sparse.tri_level import KeepRatioSchedule

from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform


COMPILE = dict(torch_compile=True, torch_compile_backend="aot_eager")


# Below the graphs a compiled Tri-Level run builds (one per grid level it reaches, at least 5 here): the run must
# raise the limit itself (`fit_recompile_limit`), or frames fall back to eager.
START_RECOMPILE_LIMIT = 4


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test counts its own compiles, starts from a recompile limit too low for a schedule's grid, and leaves
    dynamo's limits (which the schedule raises) as it found them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: one thread is fastest on a busy machine
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=START_RECOMPILE_LIMIT):
        yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


class DynamoWarnings(logging.Handler):
    """Collects dynamo's warnings (its loggers do not propagate to pytest's caplog)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def dynamo_warnings():
    handler = DynamoWarnings()
    dynamo_logger = logging.getLogger("torch._dynamo")
    dynamo_logger.addHandler(handler)
    yield handler
    dynamo_logger.removeHandler(handler)


class RatioRecorder(TrainerCallback):
    """The (token, attention) keep ratios, and dynamo's recompile limit, of every training step."""

    def __init__(self):
        self.ratios: list[tuple[float, float]] = []
        self.recompile_limits: set[int] = set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        sparsity = model.get_sparsity()
        self.ratios.append((sparsity["token_keep_ratio"], sparsity["attention_keep_ratio"]))
        self.recompile_limits.add(torch._dynamo.config.recompile_limit)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}


def test_schedule_ratios_stay_on_the_documented_grid():
    schedule = KeepRatioSchedule(warmup_fraction=0.1, decay_fraction=0.5)
    grid = schedule.grid(0.5, 0.25)
    assert len(grid) == schedule.ratio_levels == 9
    assert grid[0] == (1.0, 1.0) and grid[-1] == (0.5, 0.25)
    assert grid[4] == pytest.approx((0.75, 0.625))  # eighths of the way from 1 to the final ratios
    seen = [schedule.ratios(step / 1000, 0.5, 0.25) for step in range(1001)]
    assert set(seen) <= set(grid)  # the very floats of the grid: what compiled graphs are guarded on
    assert seen[0] == (1.0, 1.0) and seen[-1] == (0.5, 0.25)
    assert len(set(seen)) == 9
    tokens = [token for token, _ in seen]
    assert all(later <= earlier for earlier, later in zip(tokens, tokens[1:]))
    # each snapped ratio is the nearest grid level to the cosine's
    for step in range(0, 1001, 37):
        exact = 0.5 + 0.5 * schedule.cosine_weight(step / 1000)
        assert abs(schedule.ratios(step / 1000, 0.5, 0.25)[0] - exact) <= 0.5 * 0.5 / 8 + 1e-12
    continuous = KeepRatioSchedule(0.1, 0.5, ratio_levels=None)
    assert len({continuous.ratios(step / 1000, 0.5, 0.25) for step in range(1001)}) > 400
    with pytest.raises(ValueError, match="ratio_levels"):
        KeepRatioSchedule(ratio_levels=1)


def test_a_compiled_tri_level_run_compiles_once_per_grid_level_and_never_falls_back_to_eager(
    tmp_path, dynamo_warnings
):
    train_data = with_tiny_transform(tiny_image_dataset(32), train=False)
    eval_data = with_tiny_transform(tiny_image_dataset(16, seed=1), train=False)
    model = tiny_sparse_vit(num_hidden_layers=1, token_pruning_layers=[0])
    args = TriLevelTrainingArguments(
        output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        learning_rate=3e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        token_keep_ratio=0.5, attention_keep_ratio=0.5, sparsity_warmup_fraction=0.125, sparsity_decay_fraction=0.5,
        **COMPILE,
    )
    recorder = RatioRecorder()
    trainer = TriLevelTrainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                              compute_metrics=accuracy, callbacks=[recorder])
    assert model.config.problem_type == "single_label_classification"  # fixed before the first forward
    trainer.train()
    metrics = trainer.evaluate()

    # the callback raised the limit to the grid plus torch's default budget for the run, and restored it at its end
    grid = args.keep_ratio_schedule.grid(0.5, 0.5)
    assert recorder.recompile_limits == {len(grid) + 8}
    assert torch._dynamo.config.recompile_limit == START_RECOMPILE_LIMIT
    # no frame hit a recompile limit and ran eager for the rest of the run
    assert not [message for message in dynamo_warnings.messages if "recompile_limit" in message]
    graphs = counters["stats"]["unique_graphs"]
    assert counters["frames"]["ok"] == counters["frames"]["total"] == graphs
    # warm-up (dense), decay, final phase: every step on the grid, every level a single graph
    levels = set(recorder.ratios)
    assert recorder.ratios[0] == (1.0, 1.0) and recorder.ratios[-1] == (0.5, 0.5)
    assert len(levels) <= graphs <= len(levels) + 1  # one per level, plus evaluation when it is compiled
    assert levels <= set(grid) and len(levels) >= 5 > START_RECOMPILE_LIMIT
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0

    # compiled and eager logits agree, with the same kept tokens (final ratios, eval mode)
    eager = trainer.model.eval()
    compiled = torch.compile(eager, backend="aot_eager")
    pixel_values = torch.stack([eval_data[i]["pixel_values"] for i in range(8)])
    with torch.no_grad():
        expected, actual = eager(pixel_values), compiled(pixel_values)
    torch.testing.assert_close(actual.logits, expected.logits, atol=1e-5, rtol=0)
    assert len(actual.kept_patch_indices) == len(expected.kept_patch_indices) == 1
    assert torch.equal(actual.kept_patch_indices[0], expected.kept_patch_indices[0])


def test_tost_trainer_trains_compiled(tmp_path, dynamo_warnings):
    data = with_tiny_transform(tiny_image_dataset(32), train=False)
    args = ToSTTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True, seed=0, mask_method="snip", sparsity=0.9, **COMPILE,
    )
    trainer = ToSTTrainer(model=tiny_sparse_vit(num_hidden_layers=1, token_pruning_layers=[0]), args=args,
                          train_dataset=data)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
    assert counters["frames"]["ok"] == counters["frames"]["total"] >= 1
    modules = dict(trainer.model.named_modules())
    masks = get_masks(trainer.model)
    assert masks and all(torch.all(modules[name].weight[~mask] == 0) for name, mask in masks.items())
    assert not [message for message in dynamo_warnings.messages if "recompile_limit" in message]


def test_a_plain_trainer_compiles_sparse_vit_once(tmp_path):
    """The model's own loss infers `problem_type` without writing the config inside the graph (a write would change a
    guarded value and compile the model a second time)."""
    from transformers import Trainer, TrainingArguments

    data = with_tiny_transform(tiny_image_dataset(32), train=False)
    model = tiny_sparse_vit(num_hidden_layers=1, token_pruning_layers=[0], token_keep_ratio=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, remove_unused_columns=False,
                             **COMPILE)
    Trainer(model=model, args=args, train_dataset=data).train()
    assert counters["stats"]["unique_graphs"] == counters["frames"]["ok"] == counters["frames"]["total"] == 1
