"""A swift callback plugin for tests: records the LoRA gradients of every phase-1 optimizer step.

Loaded with ``--external_plugins tests/plugins/grad_recorder.py --callbacks grad_recorder``; it reads
``p.grad`` in ``on_pre_optimizer_step`` (run with ``--max_grad_norm 0`` so that nothing is clipped),
independently of GradPruner's own capture, and saves one file per step to $GRAD_RECORD_DIR.
"""

import os

import torch
from swift.callbacks import callbacks_map
from swift.callbacks.base import TrainerCallback


class GradRecorder(TrainerCallback):
    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.out = os.environ["GRAD_RECORD_DIR"]
        self.step = 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if "gradprune/phase1" not in str(args.output_dir):
            return
        grads = {
            name: param.grad.detach().clone()
            for name, param in self.trainer.model.named_parameters()
            if "lora_" in name and param.grad is not None
        }
        torch.save(grads, os.path.join(self.out, f"step{self.step:03d}.pt"))
        self.step += 1


callbacks_map["grad_recorder"] = GradRecorder
