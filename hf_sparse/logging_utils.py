"""hf_sparse's loggers follow transformers' verbosity, so the Trainer's `log_level` / `log_level_replica` govern them.

`Trainer.__init__` sets transformers' verbosity from `TrainingArguments.get_process_log_level()` (per process:
`log_level` on the main process, `log_level_replica` elsewhere); `transformers.logging.set_verbosity_info()` and
`TRANSFORMERS_VERBOSITY` set it too. A record of an `hf_sparse.*` logger made by `get_logger` is emitted when its
level reaches that verbosity, exactly as transformers' own records are: with `log_level="info"` the lottery-ticket
rounds, per-layer mask sparsity, ghosts and GradInit are shown; with `"warning"` (transformers' default) they are not.

The loggers keep their `hf_sparse.*` names and propagate to the root logger, so `logging.basicConfig`, pytest's
`caplog` and any handler a user adds see them. When no handler anywhere would receive them (nothing configured), they
go to stderr as `[hf_sparse] message`, as transformers' own do; Python's fallback would drop everything below WARNING.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from transformers.utils import logging as transformers_logging

LIBRARY_NAME = "hf_sparse"


class _TransformersVerbosity(logging.Filter):
    """Lets a record through when transformers' current verbosity would let one of its own records through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= transformers_logging.get_verbosity()


class _StderrWhenUnconfigured(logging.StreamHandler):
    """Writes to stderr only when no other handler would receive the record (no logging configured at all)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter(f"[{LIBRARY_NAME}] %(message)s"))
        self.addFilter(_TransformersVerbosity())  # also for a module logger not made by `get_logger`

    def emit(self, record: logging.LogRecord) -> None:
        if not self._other_handlers(record):
            self.stream = sys.stderr  # the stderr of now (pytest and notebooks replace it)
            super().emit(record)

    def _other_handlers(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(handler is not self for handler in logger.handlers):
                return True
            if not logger.propagate:
                return False
            logger = logger.parent
        return False


_FILTER = _TransformersVerbosity()


def _configure_library_logger() -> logging.Logger:
    library_logger = logging.getLogger(LIBRARY_NAME)
    if not any(isinstance(handler, _StderrWhenUnconfigured) for handler in library_logger.handlers):
        library_logger.addHandler(_StderrWhenUnconfigured())
        if library_logger.level == logging.NOTSET:
            # Records below the root's WARNING must reach the verbosity filter; a level the user set is kept.
            library_logger.setLevel(logging.DEBUG)
    return library_logger


def get_logger(name: str) -> logging.Logger:
    """The logger of an hf_sparse module (`get_logger(__name__)`), following transformers' verbosity."""
    if name != LIBRARY_NAME and not name.startswith(LIBRARY_NAME + "."):
        raise ValueError(f"`name` must be hf_sparse or a module under it, got {name!r}.")
    _configure_library_logger()
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


@contextlib.contextmanager
def transformers_verbosity_at_least(level: int) -> Iterator[None]:
    """Raise transformers' verbosity to at least `level` inside the block (and the hf_sparse loggers with it), then
    restore it: used to keep inner Trainers (the lottery ticket's rounds) from printing their own banners."""
    previous = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity(max(previous, level))
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)
