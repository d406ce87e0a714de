"""ToST weight masks under FSDP2 (2 CPU processes, gloo) and the sharding set-ups that are refused before any step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import ViTConfig, ViTForImageClassification

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.tost.masks import MaskConfig, prune_model, reapply

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_tost.py"


def tiny_vit() -> ViTForImageClassification:
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=32, image_size=8, patch_size=4, num_labels=3))


@pytest.mark.slow
def test_fsdp2_keeps_pruned_weights_exactly_zero_and_saves_them_whole(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(SCRIPT), "api",
               str(tmp_path)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for record in ranks:
        assert record["sharded"]  # the masked weights really were DTensors
        assert len(record["steps"]) == 3
        for step in record["steps"]:
            # gradient hooks on the sharded parameters, applied after the reduce-scatter: no gradient, no Adam
            # moment, no value for a pruned weight, before any reapply()
            assert step["pruned_grad"] == 0.0 and step["pruned_moment"] == 0.0 and step["pruned_weight"] == 0.0
            assert step["sparsity"] == pytest.approx(0.6, abs=1e-3)  # the whole weights, summed over the shards
        assert record["saved_masks_equal"]  # saved whole
        assert record["saved_pruned_max"] == 0.0 and record["saved_kept_trained"]
        assert record["saved_kept_nonzero"] == 1.0  # no kept weight was zeroed: the zeros are exactly the mask's
        assert record["loaded_pruned_max"] == 0.0  # loaded whole into a freshly sharded model
        assert record["loaded_sparsity"] == pytest.approx(0.6, abs=1e-3)
        # sharded and unsharded masked weights together: the unsharded ones counted once, not once per rank
        assert record["mixed_sharded_and_plain"] and record["mixed_sparsity"] == pytest.approx(0.6, abs=1e-3)
        message = record["refusals"]["trainer_fully_shard"]
        assert "already sharded" in message and "fsdp_version: 2" in message
    assert ranks[0]["steps"] == ranks[1]["steps"]


def _fake_accelerator(state: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(state=state, unwrap_model=lambda model: model)


def _trainer(tmp_path: Path, model: nn.Module | None = None, **fields) -> ToSTTrainer:
    args = ToSTTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **fields)
    return ToSTTrainer(model=model or tiny_vit(), args=args)


@pytest.mark.parametrize(
    ("flag", "state", "named"),
    [
        ("is_fsdp_enabled", SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)), "FSDP1"),
        ("is_deepspeed_enabled", SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)), "ZeRO-3"),
    ],
    ids=["fsdp1", "zero3"],
)
def test_trainer_refuses_fsdp1_and_zero3_naming_what_to_use(tmp_path, monkeypatch, flag, state, named):
    # accelerate turns FSDP and DeepSpeed on only for accelerator devices: the plugin the Trainer would hold is faked.
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, flag, True)
    monkeypatch.setattr(trainer, "accelerator", _fake_accelerator(state))
    with pytest.raises(ValueError, match=named) as error:
        trainer._check_sharding()
    assert "fsdp_version: 2" in str(error.value) and "DDP" in str(error.value)


def test_trainer_accepts_fsdp2(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(trainer, "accelerator", _fake_accelerator(SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=2))))
    trainer._check_sharding()  # no error


class _FakeFSDP1(FullyShardedDataParallel):
    """Of the FSDP1 wrapper class, around `module`, without FSDP1's set-up (which needs an accelerator device)."""

    def __init__(self, module: nn.Module) -> None:
        nn.Module.__init__(self)
        self._fsdp_wrapped_module = module

    __getattr__ = nn.Module.__getattr__
    _apply = nn.Module._apply


def test_fsdp1_wrapped_model_is_refused_by_the_trainer_and_the_masks(tmp_path):
    model = tiny_vit()
    prune_model(model, MaskConfig(method="magnitude", sparsity=0.5))
    wrapped = _FakeFSDP1(model)
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_version: 2"):
        reapply(wrapped)
    with pytest.raises(ValueError, match=r"FSDP1.*fsdp_version: 2"):
        _trainer(tmp_path, wrapped)


def test_lottery_ticket_rounds_refuse_fsdp():
    from hf_sparse.tost.setup import round_arguments

    with pytest.raises(ValueError, match=r"lottery_ticket.*FSDP.*DDP"):
        round_arguments(SimpleNamespace(deepspeed=None, fsdp=True), steps=2, total_steps=4, round_index=0,
                        keep_columns=False)


def test_lottery_ticket_is_refused_when_fsdp_comes_from_accelerates_config(tmp_path, monkeypatch):
    """`accelerate launch --config_file fsdp.yaml` leaves `args.fsdp` empty; the accelerator's plugin says FSDP is on
    (the Trainer's `is_fsdp_enabled` is read from it), and even FSDP2 cannot shard IMP's whole-parameter rounds."""
    trainer = _trainer(tmp_path, mask_method="lottery_ticket", sparsity=0.5)
    assert not trainer.args.fsdp  # nothing about FSDP in the arguments
    monkeypatch.setattr(trainer, "accelerator", _fake_accelerator(SimpleNamespace(
        fsdp_plugin=SimpleNamespace(fsdp_version=2))))
    with pytest.raises(ValueError, match=r"lottery_ticket.*does not support FSDP.*DDP"):
        trainer._check_sharding()
    trainer.args.mask_method = "magnitude"
    trainer._check_sharding()  # FSDP2 itself is supported
