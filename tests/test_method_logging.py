"""What the methods do is logged through transformers' verbosity: the Trainer's `log_level` shows or hides it, each
lottery-ticket round is logged once with its label, and the rounds' inner Trainers print no banners of their own."""

from __future__ import annotations

import io
import logging

import pytest
import torch
from transformers.utils import logging as transformers_logging

from hf_sparse import ToSTTrainer, ToSTTrainingArguments
from hf_sparse.cli import main as cli_main
from hf_sparse.logging_utils import get_logger

from tri_level_helpers import tiny_image_dataset, tiny_sparse_vit, with_tiny_transform

BANNER = "***** Running training *****"


@pytest.fixture(autouse=True)
def restore_verbosity():
    """`Trainer.__init__` sets transformers' (process-wide) verbosity from `log_level`: put it back after each test."""
    verbosity = transformers_logging.get_verbosity()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    transformers_logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_lottery_ticket(tmp_path, log_level: str) -> tuple[list[str], list[str]]:
    """A 3-round lottery ticket (sparsity 0.488 = 1 - 0.8^3) with soft ghosts and density rescaling, trained for 4
    steps; returns (hf_sparse's messages that reach the root logger, transformers' messages)."""
    hf_sparse_messages, transformers_messages = Collect(), Collect()
    logging.getLogger().addHandler(hf_sparse_messages)
    logging.getLogger("transformers").addHandler(transformers_messages)  # it does not propagate to the root
    try:
        args = ToSTTrainingArguments(
            output_dir=str(tmp_path / log_level), max_steps=4, per_device_train_batch_size=8, report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True, log_level=log_level, mask_method="lottery_ticket",
            sparsity=0.488, lottery_ticket_round_fraction=0.25, ghost_soft_neurons=True, ghost_end_fraction=0.5,
            rescaled_init="density",
        )
        data = with_tiny_transform(tiny_image_dataset(32), train=False)
        ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data).train()
    finally:
        logging.getLogger().removeHandler(hf_sparse_messages)
        logging.getLogger("transformers").removeHandler(transformers_messages)
    return hf_sparse_messages.messages, transformers_messages.messages


def test_log_level_info_shows_each_imp_round_once_labelled_and_the_techniques(tmp_path):
    messages, transformers_messages = run_lottery_ticket(tmp_path, "info")
    rounds = [message for message in messages if message.startswith("IMP round")]
    assert rounds == ["IMP round 1/3, sparsity 0.200", "IMP round 2/3, sparsity 0.360", "IMP round 3/3, sparsity 0.488"]
    assert not any("Lottery ticket round" in message for message in messages)  # not a second line per round
    assert any(message.startswith("Lottery ticket: 3 IMP rounds") for message in messages)
    assert any(message.startswith("ToST mask (lottery_ticket") for message in messages)
    assert sum("sparsity 0.4" in message and "layers.0.attention" in message for message in messages) >= 4  # per layer
    assert any(message.startswith("Ghost soft neurons attached at step 0") for message in messages)
    assert any(message.startswith("Ghost soft neurons removed at step 2") for message in messages)
    assert any(message.startswith("Rescaled init: 12 masked weights") for message in messages)
    # the run's own banner, not one per IMP round
    assert transformers_messages.count(BANNER) == 1
    assert transformers_logging.get_verbosity() == logging.INFO  # the rounds gave the run's verbosity back


def test_log_level_warning_hides_them(tmp_path):
    messages, transformers_messages = run_lottery_ticket(tmp_path, "warning")
    assert not any("IMP round" in message or "Ghost" in message or "ToST mask" in message for message in messages)
    assert BANNER not in transformers_messages


@pytest.mark.parametrize("log_level", ["info", "warning"])
def test_a_gradinit_run_logs_its_line_at_info_only(tmp_path, log_level):
    messages = Collect()
    logging.getLogger().addHandler(messages)
    try:
        args = ToSTTrainingArguments(
            output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=8, report_to=[], save_strategy="no",
            use_cpu=True, disable_tqdm=True, log_level=log_level, mask_method="magnitude", sparsity=0.5,
            rescaled_init="gradinit", rescaled_init_steps=2,
        )
        data = with_tiny_transform(tiny_image_dataset(16), train=False)
        ToSTTrainer(model=tiny_sparse_vit(), args=args, train_dataset=data).setup_sparsity()
    finally:
        logging.getLogger().removeHandler(messages)
    lines = [message for message in messages.messages if message.startswith("GradInit: 2 steps, held-out loss")]
    assert len(lines) == (1 if log_level == "info" else 0), messages.messages


def test_hf_sparse_messages_reach_stderr_when_logging_is_not_configured(monkeypatch, capsys):
    """As transformers' own messages do: Python's last-resort handler would drop INFO."""
    logger = get_logger("hf_sparse.tests.unconfigured")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    transformers_logging.set_verbosity_info()
    logger.info("shown at INFO")
    logger.debug("hidden at INFO")
    transformers_logging.set_verbosity_warning()
    logger.info("hidden at WARNING")
    assert capsys.readouterr().err == "[hf_sparse] shown at INFO\n"
    stream = io.StringIO()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler(stream)])  # the user's own
    logger.warning("once, through the user's handler")
    assert capsys.readouterr().err == "" and stream.getvalue() == "once, through the user's handler\n"


def test_get_logger_refuses_names_outside_hf_sparse():
    with pytest.raises(ValueError, match="`name` must be hf_sparse"):
        get_logger("transformers.trainer")


def test_the_train_command_leaves_logging_to_the_log_level(tmp_path, monkeypatch, capsys):
    """`hf-sparse train` configures no logging of its own: with none configured, the IMP rounds go to stderr as
    `[hf_sparse] ...` at `log_level: info` (as transformers' messages do), no root handler is added to the caller's
    process and a level the user gave hf_sparse's logger is kept."""
    images = tmp_path / "images"
    for index, example in enumerate(tiny_image_dataset(32)):
        (images / str(example["label"])).mkdir(parents=True, exist_ok=True)
        example["image"].save(images / str(example["label"]) / f"{index}.png")
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # nothing configured (pytest's capture is off)
    library_logger = logging.getLogger("hf_sparse")
    monkeypatch.setattr(library_logger, "level", logging.DEBUG)  # the user's level
    assert cli_main([
        "train", "tost", "--dataset_name", str(images), "--num_channels", "1", "--hidden_size", "16",
        "--num_hidden_layers", "2", "--num_attention_heads", "2", "--intermediate_size", "32", "--patch_size", "2",
        "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "info",
        "--mask_method", "lottery_ticket", "--sparsity", "0.36", "--lottery_ticket_round_fraction", "0.5",
    ]) == 0
    output = capsys.readouterr()
    rounds = [line for line in output.err.splitlines() if line.startswith("[hf_sparse] IMP round")]
    assert [line.split(",")[0] for line in rounds] == ["[hf_sparse] IMP round 1/2", "[hf_sparse] IMP round 2/2"]
    assert "IMP round" not in output.out
    assert logging.getLogger().handlers == [] and library_logger.level == logging.DEBUG
