"""Trains a tiny model with checkpoints every 4 steps and then slows down, so a test can SIGKILL it mid-run."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from transformers import TrainerCallback  # noqa: E402

from resume_cases import build_trainer  # noqa: E402


class SlowDownAfter(TrainerCallback):
    """Steps after the first checkpoints take long enough for the test to kill the process between saves."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            time.sleep(0.5)


if __name__ == "__main__":
    trainer_name, output_dir = sys.argv[1], sys.argv[2]
    build_trainer(trainer_name, output_dir, callbacks=[SlowDownAfter(8)]).train()
