"""`TriLevelTrainingArguments`: `TrainingArguments` plus the three levels of Tri-Level E-ViT."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..validation import check_choice, check_fraction
from .example_pruning import TIE_BREAKS
from .schedule import KeepRatioSchedule

EXAMPLE_PRUNING_METHODS = ("forgetting", "infobatch", "infobatch_fixed_size", "random", "none")
DEFAULT_INACTIVE_FRACTION = 0.2  # the paper's
DEFAULT_INFOBATCH_DELTA = 0.875  # InfoBatch's
DEFAULT_INFOBATCH_TAIL_FRACTION = 0.125


@dataclass
class TriLevelTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the three levels of Tri-Level E-ViT. The schedule and the example-pruning settings
    follow the paper; which levels are on by default follows the measurements (`example_pruning="none"`).

    The final token and attention keep ratios belong to the model (`config.token_keep_ratio`,
    `config.attention_keep_ratio`); `token_keep_ratio` / `attention_keep_ratio` here default to the model's own and,
    when set, replace them (the trainer says so once).

    Example pruning: `"forgetting"` is the paper's level 1; `"infobatch"` is InfoBatch itself (its paper and code:
    the first epoch trains every example, then each epoch leaves out `infobatch_prune_ratio` of the examples whose
    loss is below the mean and up-weights the rest of them by 1 / (1 - `infobatch_prune_ratio`), so epochs vary in
    size; the epochs after the first `infobatch_delta` of the run train everything; the learning rate follows the
    run's progress in epochs); `"infobatch_fixed_size"` is our variant at a constant epoch size set by
    `example_inactive_fraction` (uniform subsets in its first epoch and its last `infobatch_tail_fraction` of the
    epochs). Before hf_sparse's state format 2, `"infobatch"` meant the fixed-size variant: pass
    `"infobatch_fixed_size"` for what it did; passing `example_inactive_fraction` with `"infobatch"` is an error that
    says so. `"random"` trains a fresh uniform subset each epoch (the control).

    `ddp_find_unused_parameters` defaults to False here (the Trainer's default searches for unused parameters every
    step under DDP); set it to True for a model with parameters that get no gradient.
    """

    # "none" by default: token pruning alone is the setting that won `hf-sparse bench e2e` over 3 seeds in both
    # regimes (README); "forgetting" is the paper's level 1, "infobatch" InfoBatch itself, all opt-in.
    example_pruning: str = field(
        default="none",
        metadata={"help": f"Example-level pruning: one of {EXAMPLE_PRUNING_METHODS} (default none; the paper's is "
                  "forgetting; infobatch is InfoBatch itself, infobatch_fixed_size our constant-size variant, "
                  "which was called infobatch before).", "choices": EXAMPLE_PRUNING_METHODS},
    )
    example_inactive_fraction: float | None = field(
        default=None,
        metadata={
            "help": f"Fraction of the training set left out of every epoch (default: {DEFAULT_INACTIVE_FRACTION}, "
            "the paper's; 0 with example_pruning='none'; not with 'infobatch', whose epoch sizes follow from the "
            "losses)."
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
        default=0.5,
        metadata={"help": "infobatch, infobatch_fixed_size: share of the below-mean-loss pool left out of an epoch "
                  "(InfoBatch: 0.5); below 1."},
    )
    infobatch_delta: float | None = field(
        default=None,
        metadata={"help": f"infobatch: the first floor(delta * epochs) epochs prune, the rest train every example "
                  f"(default: {DEFAULT_INFOBATCH_DELTA}, InfoBatch's)."},
    )
    infobatch_tail_fraction: float | None = field(
        default=None,
        metadata={"help": "infobatch_fixed_size: final fraction of the epochs trained on uniform subsets (default: "
                  f"{DEFAULT_INFOBATCH_TAIL_FRACTION})."},
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
        self._check_infobatch_fields()
        if self.example_pruning != "infobatch":  # InfoBatch's sizes follow from its losses
            self._check_inactive_fraction()
        check_fraction("example_refresh_fraction", self.example_refresh_fraction, low_inclusive=False,
                       high_inclusive=True)
        check_fraction("example_last_refresh_fraction", self.example_last_refresh_fraction, high_inclusive=True)
        check_fraction("example_swap_fraction", self.example_swap_fraction)
        if self.example_pruning == "forgetting" and self.example_swap_fraction > self.example_inactive_fraction:
            raise ValueError(
                f"`example_swap_fraction`={self.example_swap_fraction} swaps more examples than are inactive "
                f"(`example_inactive_fraction`={self.example_inactive_fraction}): it must be at most that."
            )
        for name in ("token_keep_ratio", "attention_keep_ratio"):
            if getattr(self, name) is not None:
                check_fraction(name, getattr(self, name), low_inclusive=False, high_inclusive=True)
        KeepRatioSchedule(self.sparsity_warmup_fraction, self.sparsity_decay_fraction)  # raises naming the field

    def _check_inactive_fraction(self) -> None:
        if self.example_inactive_fraction is None:
            self.example_inactive_fraction = 0.0 if self.example_pruning == "none" else DEFAULT_INACTIVE_FRACTION
        check_fraction("example_inactive_fraction", self.example_inactive_fraction)
        if self.example_pruning == "none" and self.example_inactive_fraction != 0.0:
            raise ValueError(
                f"`example_inactive_fraction`={self.example_inactive_fraction} needs example pruning: with "
                "`example_pruning='none'` every example is trained. Choose a method with a fixed epoch size "
                "(forgetting, infobatch_fixed_size, random) or leave the fraction unset."
            )
        if self.example_pruning != "none" and self.example_inactive_fraction == 0.0:
            raise ValueError(
                f"`example_inactive_fraction` must be > 0 with `example_pruning`={self.example_pruning!r} "
                "(or set `example_pruning='none'`)."
            )

    def _check_infobatch_fields(self) -> None:
        """InfoBatch's two modes read different fields: one set for the other mode is an error (other methods leave
        them unused, as they do the forgetting fields)."""
        check_fraction("infobatch_prune_ratio", self.infobatch_prune_ratio, low_inclusive=False)
        method = self.example_pruning
        if self.infobatch_delta is not None and method == "infobatch_fixed_size":
            raise ValueError("`infobatch_delta` applies to `example_pruning='infobatch'`; 'infobatch_fixed_size' ends "
                             "with its last `infobatch_tail_fraction` of the epochs unpruned.")
        if self.infobatch_tail_fraction is not None and method == "infobatch":
            raise ValueError("`infobatch_tail_fraction` applies to `example_pruning='infobatch_fixed_size'`; "
                             "'infobatch' trains every example after the first `infobatch_delta` of the epochs.")
        if method == "infobatch_fixed_size" and self.infobatch_tail_fraction is None:
            self.infobatch_tail_fraction = DEFAULT_INFOBATCH_TAIL_FRACTION
        if self.infobatch_tail_fraction is not None:
            check_fraction("infobatch_tail_fraction", self.infobatch_tail_fraction)
        if self.infobatch_delta is not None:
            check_fraction("infobatch_delta", self.infobatch_delta, high_inclusive=True)
        if method != "infobatch":
            return
        if self.example_inactive_fraction is not None:
            raise ValueError(
                f"`example_inactive_fraction`={self.example_inactive_fraction} does not apply to "
                "`example_pruning='infobatch'` (InfoBatch itself: its epoch sizes follow from the losses; "
                "`infobatch_prune_ratio` sets how much it prunes). For a constant epoch size, as 'infobatch' meant "
                "before, use `example_pruning='infobatch_fixed_size'`."
            )
        if self.infobatch_delta is None:
            self.infobatch_delta = DEFAULT_INFOBATCH_DELTA
        if self.max_steps > 0:
            raise ValueError(f"`max_steps`={self.max_steps} with `example_pruning='infobatch'`: InfoBatch plans its "
                             "run in epochs (its last epochs train every example); set `num_train_epochs` instead.")
        if self.num_train_epochs != int(self.num_train_epochs):
            raise ValueError(f"`num_train_epochs`={self.num_train_epochs} with `example_pruning='infobatch'`: "
                             "InfoBatch plans whole epochs; give a whole number.")

    @property
    def keep_ratio_schedule(self) -> KeepRatioSchedule:
        return KeepRatioSchedule(self.sparsity_warmup_fraction, self.sparsity_decay_fraction)
