"""Two ranks on CPU through `accelerate launch` (gloo): the global active set, InfoBatch's per-epoch plans, and
checkpoints written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "two_rank_training.py"


def launch_two_ranks(trainer_name: str, output_dir: Path) -> list[dict]:
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), trainer_name, str(output_dir)]
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_tri_level_two_ranks_share_one_global_active_set(tmp_path):
    ranks = launch_two_ranks("tri_level", tmp_path)
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = ranks
    assert first["active"] == second["active"]
    assert first["epoch_order"] == second["epoch_order"]
    assert first["forgetting_count"] == second["forgetting_count"]
    assert first["weights_checksum"] == pytest.approx(second["weights_checksum"], rel=1e-6)  # DDP kept them in sync
    # DDP built without the per-step search for unused parameters (every parameter gets a gradient)
    assert [(r["ddp_wrapper"], r["find_unused_parameters"]) for r in ranks] == [("DistributedDataParallel", False)] * 2
    # 48 active examples per epoch split over 2 ranks x 4 -> 6 steps per epoch, 3 epochs; every rank saw all
    assert first["global_step"] == 18 and first["samples_seen"] == 3 * 48
    assert len(first["active"]) == 48
    assert first["last_loss"] < first["first_loss"]
    checkpoints = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{s}" for s in sorted([3, 6, 9, 12, 15, 18])] or len(checkpoints) == 6
    for checkpoint in tmp_path.glob("checkpoint-*"):
        assert (checkpoint / "example_pruning.safetensors").exists()
        # written once, by the main process: one model file, one pruning state
        assert len(list(checkpoint.glob("model*.safetensors"))) == 1


@pytest.mark.slow
def test_infobatch_two_ranks_plan_the_same_varying_epochs_and_end_the_schedule(tmp_path):
    first, second = launch_two_ranks("infobatch", tmp_path)
    assert [first["world_size"], second["world_size"]] == [2, 2]
    # both ranks planned every epoch alike from the gathered losses: sizes, steps, order, scores
    assert first["epoch_sizes"] == second["epoch_sizes"] and len(first["epoch_sizes"]) == 4
    assert first["optimizer_steps_per_epoch"] == second["optimizer_steps_per_epoch"]
    assert first["epoch_order"] == second["epoch_order"]
    assert first["last_loss"] == second["last_loss"]
    sizes, steps = first["epoch_sizes"], first["optimizer_steps_per_epoch"]
    # the first epoch has no scores and trains everything; a later one left well-learned examples out;
    # the last (after delta = 0.75 of the run) trains everything again
    assert sizes[0] == sizes[-1] == first["num_examples"] == 64
    assert min(sizes) < first["num_examples"]
    # each epoch's examples over 2 ranks x 4 per step (the last batch may be partial)
    assert steps == [-(-size // 8) for size in sizes]
    # the Trainer's step count followed the planned epochs, and the schedule ended exactly at the run's end
    assert first["global_step"] == first["max_steps"] == sum(steps)
    assert second["global_step"] == second["max_steps"] == sum(steps)
    assert first["final_learning_rate"] == second["final_learning_rate"] == 0.0
    assert first["losses"] == pytest.approx(second["losses"], rel=1e-6)  # logged losses are averaged over ranks
    assert first["weights_checksum"] == pytest.approx(second["weights_checksum"], rel=1e-6)  # DDP kept them in sync


@pytest.mark.slow
def test_tost_two_ranks_hold_identical_masks_and_write_checkpoints_once(tmp_path):
    ranks = launch_two_ranks("tost", tmp_path)
    first, second = ranks
    assert [r["world_size"] for r in ranks] == [2, 2]
    # both ranks computed the same SNIP mask on their own (same seed and batches), before rank 0's was broadcast
    assert first["masks_identical_before_sync"] and second["masks_identical_before_sync"]
    assert first["mask_checksums"] == second["mask_checksums"] and len(first["mask_checksums"]) == 12
    assert abs(first["mask_sparsity"] - 0.8) <= 0.005
    assert first["pruned_nonzero"] == second["pruned_nonzero"] == 0
    assert first["weights_checksum"] == pytest.approx(second["weights_checksum"], rel=1e-6)
    # 64 examples / (2 ranks x 4) -> 8 steps per epoch, 3 epochs; ghosts gone after 30 % (at step 8)
    assert first["global_step"] == 24 and first["ghost_removed_at_step"] == second["ghost_removed_at_step"] == 8
    assert first["last_loss"] < first["first_loss"]
    # no search for unused parameters, through the ghost phase, the ghosts' removal and the rest of training
    assert [(r["ddp_wrapper"], r["find_unused_parameters"]) for r in ranks] == [("DistributedDataParallel", False)] * 2
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert [p.name for p in checkpoints] == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]
    for checkpoint in checkpoints:
        # written once, by the main process: one model file and one mask file
        assert len(list(checkpoint.glob("model*.safetensors"))) == 1
        assert len(list(checkpoint.glob("sparsity_masks*"))) == 1



@pytest.mark.slow
def test_tost_on_a_resnet_two_ranks_find_the_same_lottery_ticket(tmp_path):
    first, second = launch_two_ranks("tost_resnet", tmp_path)
    assert [first["world_size"], second["world_size"]] == [2, 2]
    assert first["masks_identical_before_sync"] and second["masks_identical_before_sync"]
    assert first["mask_checksums"] == second["mask_checksums"] and len(first["mask_checksums"]) == 5
    assert abs(first["mask_sparsity"] - 0.8) <= 0.005 and first["pruned_nonzero"] == second["pruned_nonzero"] == 0
    assert first["weights_checksum"] == pytest.approx(second["weights_checksum"], rel=1e-6)
    assert first["global_step"] == 24 and first["ghost_removed_at_step"] == second["ghost_removed_at_step"] == 8
    assert (first["find_unused_parameters"], second["find_unused_parameters"]) == (False, False)


@pytest.mark.parametrize("explicit", [None, True, False])
def test_trainers_skip_ddps_search_for_unused_parameters_unless_asked(tmp_path, explicit):
    from hf_sparse import ToSTTrainer, ToSTTrainingArguments, TriLevelTrainer, TriLevelTrainingArguments
    from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

    data = with_tiny_transform(tiny_image_dataset(16))
    chosen = {} if explicit is None else {"ddp_find_unused_parameters": explicit}
    for trainer_class, arguments_class in ((TriLevelTrainer, TriLevelTrainingArguments),
                                           (ToSTTrainer, ToSTTrainingArguments)):
        args = arguments_class(output_dir=str(tmp_path), report_to=[], use_cpu=True, **chosen)
        assert args.ddp_find_unused_parameters is (False if explicit is None else explicit)
        trainer = trainer_class(model=tiny_sparse_vit(), args=args, train_dataset=data)
        # what accelerate hands to DistributedDataParallel
        assert trainer.accelerator.ddp_handler.find_unused_parameters is (False if explicit is None else explicit)
