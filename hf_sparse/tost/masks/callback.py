"""`MaskCallback`: pruned weights back to exact zeros after every optimizer step of a `Trainer` run."""

from __future__ import annotations

from transformers import TrainerCallback

from .model import reapply


class MaskCallback(TrainerCallback):
    """The gradient hooks already keep pruned weights at zero; this re-applies the masks after each optimizer step as
    a guard against anything that writes weights outside autograd (weight decay in some optimizers, EMA, loading).

    At the start of training, after the Trainer has wrapped the model (FSDP2 replaces the parameters by sharded
    DTensors), it moves the gradient hooks and the cached masks onto the parameters the optimizer will step."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        reapply(model)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        reapply(model)
