"""`TriLevelTrainingArguments`: `TrainingArguments` plus the three levels of Tri-Level E-ViT."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..validation import check_choice, check_fraction
from .example_pruning import TIE_BREAKS
from .schedule import KeepRatioSchedule

EXAMPLE_PRUNING_METHODS = ("forgetting", "infobatch", "random", "none")
DEFAULT_INACTIVE_FRACTION = 0.2  # the paper's


@dataclass
class TriLevelTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the three levels of Tri-Level E-ViT. The schedule and the example-pruning settings
    follow the paper; which levels are on by default follows the measurements (`example_pruning="none"`).

    The final token and attention keep ratios belong to the model (`config.token_keep_ratio`,
    `config.attention_keep_ratio`); `token_keep_ratio` / `attention_keep_ratio` here default to the model's own and,
    when set, replace them (the trainer says so once).

    `ddp_find_unused_parameters` defaults to False here (the Trainer's default searches for unused parameters every
    step under DDP); set it to True for a model with parameters that get no gradient.
    """

    # "none" by default: token pruning alone is the setting that won `hf-sparse bench e2e` over 3 seeds in both
    # regimes (README); "forgetting" is the paper's level 1 and "infobatch" the faster one, both opt-in.
    example_pruning: str = field(
        default="none",
        metadata={"help": f"Example-level pruning: one of {EXAMPLE_PRUNING_METHODS} (default none; the paper's is "
                  "forgetting).", "choices": EXAMPLE_PRUNING_METHODS},
    )
    example_inactive_fraction: float | None = field(
        default=None,
        metadata={
            "help": f"Fraction of the training set left out of every epoch (default: {DEFAULT_INACTIVE_FRACTION}, "
            "the paper's; 0 with example_pruning='none')."
        },
    )
    example_refresh_fraction: float = field(
        default=0.1, metadata={"help": "Forgetting: re-score and swap examples every this fraction of the epochs."}
    )
    example_last_refresh_fraction: float = field(
        default=0.5, metadata={"help": "Forgetting: no refresh after this fraction of the epochs (paper: half)."}
    )
    example_swap_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Forgetting: fraction of the data swapped at each refresh (paper: 0.05); at most the inactive "
            "fraction."
        },
    )
    example_tie_break: str = field(
        default="cls_attention_variance",
        metadata={"help": f"Forgetting ties broken by: one of {TIE_BREAKS}.", "choices": TIE_BREAKS},
    )
    infobatch_prune_ratio: float = field(
        default=0.5, metadata={"help": "InfoBatch: fraction of the low-loss pool dropped each epoch (InfoBatch: 0.5)."}
    )
    infobatch_tail_fraction: float = field(
        default=0.125, metadata={"help": "InfoBatch: final fraction of the epochs trained without loss-based pruning."}
    )
    token_keep_ratio: float | None = field(
        default=None,
        metadata={"help": "Final fraction of patch tokens kept at each pruning layer (default: the model's own)."},
    )
    attention_keep_ratio: float | None = field(
        default=None,
        metadata={"help": "Final fraction of patch keys kept per patch query (default: the model's own)."},
    )
    sparsity_warmup_fraction: float = field(
        default=10 / 300, metadata={"help": "Fraction of training with dense tokens/attention (paper: 10/300)."}
    )
    sparsity_decay_fraction: float = field(
        default=100 / 300, metadata={"help": "Fraction of training over which ratios go from 1 to final by cosine."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.ddp_find_unused_parameters is None:
            # Every parameter of the model gets a gradient at every step, so DDP need not search the autograd graph for
            # unused ones (the Trainer's default unless gradient checkpointing is on). An explicit True is kept.
            self.ddp_find_unused_parameters = False
        check_choice("example_pruning", self.example_pruning, EXAMPLE_PRUNING_METHODS)
        check_choice("example_tie_break", self.example_tie_break, TIE_BREAKS)
        if self.example_inactive_fraction is None:
            self.example_inactive_fraction = 0.0 if self.example_pruning == "none" else DEFAULT_INACTIVE_FRACTION
        check_fraction("example_inactive_fraction", self.example_inactive_fraction)
        if self.example_pruning == "none" and self.example_inactive_fraction != 0.0:
            raise ValueError(
                f"`example_inactive_fraction`={self.example_inactive_fraction} needs example pruning: with "
                "`example_pruning='none'` every example is trained. Choose a method (forgetting, infobatch, random) "
                "or leave the fraction unset."
            )
        if self.example_pruning != "none" and self.example_inactive_fraction == 0.0:
            raise ValueError(
                f"`example_inactive_fraction` must be > 0 with `example_pruning`={self.example_pruning!r} "
                "(or set `example_pruning='none'`)."
            )
        check_fraction("example_refresh_fraction", self.example_refresh_fraction, low_inclusive=False,
                       high_inclusive=True)
        check_fraction("example_last_refresh_fraction", self.example_last_refresh_fraction, high_inclusive=True)
        check_fraction("example_swap_fraction", self.example_swap_fraction)
        if self.example_pruning == "forgetting" and self.example_swap_fraction > self.example_inactive_fraction:
            raise ValueError(
                f"`example_swap_fraction`={self.example_swap_fraction} swaps more examples than are inactive "
                f"(`example_inactive_fraction`={self.example_inactive_fraction}): it must be at most that."
            )
        check_fraction("infobatch_prune_ratio", self.infobatch_prune_ratio, low_inclusive=False)
        check_fraction("infobatch_tail_fraction", self.infobatch_tail_fraction)
        for name in ("token_keep_ratio", "attention_keep_ratio"):
            if getattr(self, name) is not None:
                check_fraction(name, getattr(self, name), low_inclusive=False, high_inclusive=True)
        KeepRatioSchedule(self.sparsity_warmup_fraction, self.sparsity_decay_fraction)  # raises naming the field

    @property
    def keep_ratio_schedule(self) -> KeepRatioSchedule:
        return KeepRatioSchedule(self.sparsity_warmup_fraction, self.sparsity_decay_fraction)
