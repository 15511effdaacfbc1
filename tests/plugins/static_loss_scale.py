"""A swift callback plugin for tests: gives DeepSpeed's ZeRO optimizer a static loss scale.

This CPU has no fp16 kernels, so DeepSpeed refuses fp16 here, and for float32/bf16 it builds a loss
scaler fixed at 1. Setting the optimizer's ``loss_scale`` (a property of DeepSpeed's ZeRO-1/2 and
ZeRO-3 optimizers) when training begins makes DeepSpeed's own code scale the loss in ``backward``
and unscale the gradients in ``step``, exactly as an fp16 run with a static scale does; a power of
two keeps the arithmetic exact. Loaded with ``--external_plugins tests/plugins/static_loss_scale.py
--callbacks static_loss_scale``; the scale comes from $GRADPRUNE_TEST_LOSS_SCALE.
"""

import os

from swift.callbacks import callbacks_map
from swift.callbacks.base import TrainerCallback


class StaticLossScale(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        optimizer = self.trainer.deepspeed.optimizer
        optimizer.loss_scale = float(os.environ["GRADPRUNE_TEST_LOSS_SCALE"])
        print(f"[test plugin] DeepSpeed {type(optimizer).__name__} loss scale = {optimizer.loss_scale}", flush=True)


callbacks_map["static_loss_scale"] = StaticLossScale
