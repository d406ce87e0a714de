"""Two ranks on CPU through `accelerate launch` (gloo): the global active set and checkpoints written once."""

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
