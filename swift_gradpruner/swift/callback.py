"""A TrainerCallback that feeds the IGIA accumulator once per optimizer step and stops after t steps.

Where the gradients are read (transformers 5.19, accelerate 1.15, DeepSpeed 0.19):

* without DeepSpeed the Trainer calls ``accelerator.clip_grad_norm_`` once per optimizer step (with
  ``max_norm=inf`` when clipping is off), which calls ``accelerator.unscale_gradients`` before
  clipping; wrapping the latter gives gradients that are accumulated and unscaled but not clipped.
  ``on_pre_optimizer_step`` would be too late: it runs after clipping.
* under DeepSpeed, accelerate calls ``engine.step()`` inside ``accelerator.backward`` at the
  accumulation boundary, before any callback, and step clears the gradients; wrapping the engine's
  ``step`` reads them (gathered, see zero.py) just before.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..capture import GradReader, local_grad, lora_pairs, read_lora_grads
from ..importance import IGIAAccumulator
from ..zero import full_grad_reader

logger = logging.getLogger(__name__)


class IGIACaptureCallback(TrainerCallback):
    """Capture the LoRA gradients of the first ``steps`` optimizer steps, then stop training.

    ``steps`` may be a callable of the run's total optimizer steps T (known only once training
    starts). Every rank reads the gradients (the DeepSpeed reads are collectives); only
    ``accumulate`` ranks keep them.
    """

    def __init__(self, trainer, steps, accumulator: IGIAAccumulator, accumulate: bool = True) -> None:
        self.trainer = trainer
        self.steps = steps
        self.accumulator = accumulator
        self.accumulate = accumulate
        self.captured = 0
        self.total_steps = None
        self.pairs = []
        self._restore = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.total_steps = state.max_steps
        if callable(self.steps):
            self.steps = self.steps(state.max_steps)
        self.pairs = lora_pairs(self.trainer.model)
        if not self.pairs:
            raise ValueError("GradPruner phase 1 found no LoRA layer in the model: check --target_modules")
        if self.trainer.is_deepspeed_enabled:
            engine = self.trainer.deepspeed
            original = engine.step

            def step(*a, **kw):
                if engine.is_gradient_accumulation_boundary():
                    self._capture(full_grad_reader(engine))
                return original(*a, **kw)

            self._wrap(engine, "step", step)
        else:
            accelerator = self.trainer.accelerator
            original = accelerator.unscale_gradients

            def unscale_gradients(*a, **kw):
                result = original(*a, **kw)
                self._capture()
                return result

            self._wrap(accelerator, "unscale_gradients", unscale_gradients)
        logger.info(
            f"GradPruner phase 1: capturing LoRA gradients of {len(self.pairs)} linears "
            f"for {self.steps} of {state.max_steps} optimizer steps"
        )

    def _capture(self, reader: GradReader = local_grad) -> None:
        if self.captured >= self.steps:
            return
        grads = read_lora_grads(self.pairs, reader)
        self.captured += 1
        if self.accumulate and not self.accumulator.update(grads):
            logger.warning(f"GradPruner: optimizer step {self.captured} had NaN/inf LoRA gradients; skipped")

    def on_step_end(self, args, state, control, **kwargs):
        if self.captured >= self.steps:
            control.should_training_stop = True
            control.should_save = False
            control.should_evaluate = False

    def _wrap(self, owner, name: str, wrapper) -> None:
        self._restore = (owner, name, vars(owner).get(name))
        setattr(owner, name, wrapper)

    def on_train_end(self, args, state, control, **kwargs):
        if self._restore is not None:
            owner, name, own_attribute = self._restore
            if own_attribute is None:
                delattr(owner, name)  # back to the class's method
            else:
                setattr(owner, name, own_attribute)
            self._restore = None
