"""Nothing lost when a run is stopped: SIGKILL mid-training, then resume; broken checkpoints fail clearly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hf_sparse.trainers.base import TrainingTimeCallback
from hf_sparse.trainers.checkpoints import checkpoint_problems, resolve_resume_checkpoint

from resume_cases import TOTAL_STEPS, build_trainer, final_state

SCRIPT = Path(__file__).parent / "scripts" / "killable_training.py"
TRAINERS = ["tri_level", "tost"]


def kill_after_checkpoint(name: str, output_dir: Path, checkpoint_step: int = 8) -> None:
    # Same thread count as this process: another one changes float summation order, hence the weights.
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    process = subprocess.Popen([sys.executable, str(SCRIPT), name, str(output_dir)], env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = output_dir / f"checkpoint-{checkpoint_step}" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited early: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no checkpoint appeared in time")
        time.sleep(0.05)
    time.sleep(0.7)  # into the slowed-down steps after the checkpoint
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINERS)
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, name):
    uninterrupted = build_trainer(name, str(tmp_path / "full"))
    uninterrupted.train()
    expected = final_state(uninterrupted)

    kill_after_checkpoint(name, tmp_path / "killed")
    assert not (tmp_path / "killed" / f"checkpoint-{TOTAL_STEPS[name]}").exists()  # it really died mid-run
    resumed = build_trainer(name, str(tmp_path / "killed"), model_seed=99)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == TOTAL_STEPS[name]
    actual = final_state(resumed)
    assert set(actual) == set(expected)
    for key in expected:
        if key == "weights":
            for parameter, value in expected["weights"].items():
                torch.testing.assert_close(actual["weights"][parameter], value, atol=1e-5, rtol=1e-4, msg=parameter)
        else:
            assert torch.equal(actual[key], expected[key]), key
    # the card's training time counts the killed run up to its checkpoint as well as the resumed one
    before = TrainingTimeCallback.seconds_in_checkpoint(str(tmp_path / "killed" / "checkpoint-8"))
    assert before > 0
    this_run = resumed.state.log_history[-1]["train_runtime"]
    train_seconds = resumed.training_report().train_seconds
    assert train_seconds == pytest.approx(before + this_run, abs=0.5) and train_seconds > this_run + 0.5 * before


@pytest.mark.parametrize("broken_file", ["model.safetensors", "example_pruning.safetensors", "trainer_state.json"])
def test_broken_checkpoint_names_the_file_and_the_previous_one_resumes(tmp_path, broken_file):
    trainer = build_trainer("tri_level", str(tmp_path))
    trainer.args.num_train_epochs = 2
    trainer.train()
    latest, previous = tmp_path / "checkpoint-12", tmp_path / "checkpoint-8"
    assert not checkpoint_problems(latest) and not checkpoint_problems(previous)
    path = latest / broken_file
    if broken_file == "trainer_state.json":
        path.unlink()  # killed before the Trainer's last write
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated
    with pytest.raises(ValueError, match=broken_file) as error:
        resolve_resume_checkpoint(str(latest), str(tmp_path))
    assert str(previous) in str(error.value)
    assert resolve_resume_checkpoint(True, str(tmp_path)) == str(previous)
    with pytest.raises(ValueError, match=broken_file):
        build_trainer("tri_level", str(tmp_path)).train(resume_from_checkpoint=str(latest))
    resumed = build_trainer("tri_level", str(tmp_path))
    resumed.args.num_train_epochs = 2
    resumed.train(resume_from_checkpoint=True)  # skips the broken checkpoint-12, resumes from checkpoint-8
    assert resumed.state.global_step == 12 and not checkpoint_problems(latest)  # and rewrites it whole
