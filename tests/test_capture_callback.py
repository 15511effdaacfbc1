"""IGIACaptureCallback inside a real transformers Trainer: once per optimizer step, before clipping."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

from swift_gradpruner.config import GradPruneConfigError
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.swift.callback import IGIACaptureCallback
from swift_gradpruner.tiny import build_model, chat_rows


class Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, count):
        texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in chat_rows(count)]
        self.items = [tokenizer(t, truncation=True, max_length=32, padding="max_length") for t in texts]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids = torch.tensor(self.items[i]["input_ids"])
        return {"input_ids": ids, "attention_mask": torch.tensor(self.items[i]["attention_mask"]), "labels": ids}


def trainer_for(tokenizer, tmp_path, **overrides):
    model = get_peft_model(build_model("llama", 2, len(tokenizer)), LoraConfig(r=4, target_modules="all-linear"))
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    max_steps=6, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                    use_cpu=True, max_grad_norm=1e-3, dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    settings.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=Rows(tokenizer, 64))


def test_captures_each_optimizer_step_before_clipping_then_stops(tokenizer, tmp_path):
    trainer = trainer_for(tokenizer, tmp_path)
    acc = IGIAAccumulator()
    seen_total = []
    callback = IGIACaptureCallback(trainer, lambda total: (seen_total.append(total), 4)[1], acc)
    trainer.add_callback(callback)
    trainer.train()
    assert seen_total == [6] and callback.captured == 4 and trainer.state.global_step == 4  # stopped after t
    assert acc.counts.used == 4 and acc.counts.zero == 1
    # The logged grad_norm is the pre-clip norm of all trainable (LoRA) gradients; with max_grad_norm
    # 1e-3 every step is clipped hard, so only pre-clip capture can match it.
    logged = [row["grad_norm"] for row in trainer.state.log_history if "grad_norm" in row]
    captured = [math.sqrt(sum(float(a.square().sum() + b.square().sum()) for a, b in step.values()))
                for step in acc._factors]  # fmt: skip
    assert len(logged) == 4
    assert captured == pytest.approx(logged, rel=1e-4)
    assert all(norm > 1e-2 for norm in captured)
    # The wrapper is removed at the end of training.
    assert "unscale_gradients" not in vars(trainer.accelerator)


def test_too_short_run_is_refused_when_training_starts(tokenizer, tmp_path):
    from swift_gradpruner.config import GradPruneConfig

    trainer = trainer_for(tokenizer, tmp_path, max_steps=3)
    trainer.add_callback(IGIACaptureCallback(trainer, GradPruneConfig(steps=3).phase1_steps, IGIAAccumulator()))
    with pytest.raises(GradPruneConfigError, match="steps=3 is invalid: must be < the run's 3 optimizer steps"):
        trainer.train()
