"""Checkpoint checks for resuming: a run killed while saving leaves a truncated or partial checkpoint, and resuming
from it must fail clearly (naming the file) or, with `resume_from_checkpoint=True`, fall back to the newest whole
checkpoint."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..logging_utils import get_logger

logger = get_logger(__name__)

TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last: without it the save did not finish


def checkpoint_problems(checkpoint: str | os.PathLike) -> list[str]:
    """What is wrong with a checkpoint folder (empty when it can be resumed from)."""
    folder = Path(checkpoint)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    if not (folder / TRAINER_STATE).is_file():
        problems.append(f"{folder / TRAINER_STATE} is missing: the run stopped while saving this checkpoint")
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                _check_safetensors_length(path)
            elif path.suffix == ".json":
                json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(path):
                problems.append(f"{path} is truncated or corrupted (not a complete torch zip archive)")
        except Exception as error:  # noqa: BLE001 - any failure to read means the file cannot be resumed from
            problems.append(f"{path} is truncated or corrupted ({type(error).__name__}: {error})")
    return problems


def _check_safetensors_length(path: Path) -> None:
    """The header names each tensor's byte range: the file must hold exactly that many bytes (a truncated file
    still opens, as safetensors maps it lazily)."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    data_length = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    actual = path.stat().st_size - 8 - header_length
    if actual != data_length:
        raise ValueError(f"the header describes {data_length} bytes of tensors, the file holds {actual}")
    with safe_open(str(path), framework="pt"):
        pass


def _checkpoints_newest_first(output_dir: str | os.PathLike) -> list[Path]:
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        step = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if path.is_dir() and path.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and step.isdigit():
            found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


def resolve_resume_checkpoint(resume_from_checkpoint: str | bool | None, output_dir: str) -> str | None:
    """`True`: the newest whole checkpoint in `output_dir` (warning about broken newer ones). A path: that checkpoint,
    or a `ValueError` naming each broken file and the newest whole checkpoint to use instead."""
    if resume_from_checkpoint in (None, False):
        return None
    if resume_from_checkpoint is True:
        for checkpoint in _checkpoints_newest_first(output_dir):
            problems = checkpoint_problems(checkpoint)
            if not problems:
                return str(checkpoint)
            logger.warning("Skipping broken checkpoint %s: %s", checkpoint, "; ".join(problems))
        raise ValueError(f"No whole checkpoint in output_dir {output_dir!r} to resume from.")
    problems = checkpoint_problems(resume_from_checkpoint)
    if problems:
        parent = Path(resume_from_checkpoint).parent
        whole = [c for c in _checkpoints_newest_first(parent) if not checkpoint_problems(c)]
        hint = f" The newest whole checkpoint is {whole[0]}." if whole else ""
        raise ValueError(f"Cannot resume from {resume_from_checkpoint}: " + "; ".join(problems) + "." + hint)
    return str(resume_from_checkpoint)
