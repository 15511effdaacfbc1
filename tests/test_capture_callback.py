"""IGIACaptureCallback inside a real transformers Trainer: once per optimizer step, before clipping."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

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


@pytest.fixture(autouse=True)
def plain_transformers_callbacks():
    """These tests run transformers' own Trainer. Importing swift anywhere in the process (another test file
    on the same pytest worker) swaps transformers' default flow callback for one that reads swift's own
    TrainingArguments (``swift.trainers.patcher``); put transformers' back for the test (a patch of its own:
    a test may undo its ``monkeypatch``)."""
    import transformers.trainer
    from transformers.trainer_callback import DefaultFlowCallback

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.trainer, "DEFAULT_CALLBACKS", [DefaultFlowCallback])
        yield


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


class NativeAmpFp16(TrainerCallback):
    """Marks the (prepared) accelerator as running native fp16 AMP: its unscale_gradients now unscales."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def on_train_begin(self, args, state, control, **kwargs):
        self.accelerator.native_amp = True


def test_plain_path_reads_gradients_after_the_grad_scaler_unscaled_them(tokenizer, tmp_path, monkeypatch):
    """An fp16 run's loss scaling on the plain (non-DeepSpeed) path: accelerate creates its GradScaler only
    on a GPU, so give its Accelerator one by hand. The Trainer's real sequence then runs: scaler.scale(loss)
    .backward(), unscale_gradients -> scaler.unscale_ (where the capture reads), clipping, scaler.step.
    Weights stay float32 and 1024 is a power of two, so the captured gradients must equal an unscaled run's
    exactly; read before the unscale they would be 1024 times larger."""
    from accelerate import Accelerator

    captured = {}
    for scale in (None, 1024.0):
        torch.manual_seed(0)
        trainer = trainer_for(tokenizer, tmp_path / str(scale), max_grad_norm=1.0)
        if scale is not None:
            # Before train(), so that prepare() hands the scaler to the AcceleratedOptimizer; native_amp only
            # once training began, or prepare() would wrap forward in CPU autocast (bf16).
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
            trainer.add_callback(NativeAmpFp16(trainer.accelerator))
            monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
        acc = IGIAAccumulator()
        trainer.add_callback(IGIACaptureCallback(trainer, 4, acc))
        trainer.train()
        if scale is not None:
            assert trainer.accelerator.scaler.get_scale() == scale  # no step was skipped for inf/NaN
        captured[scale] = acc._factors
        monkeypatch.undo()
    assert len(captured[None]) == len(captured[1024.0]) == 4
    for plain, scaled in zip(captured[None], captured[1024.0]):
        for name, (grad_a, grad_b) in plain.items():
            torch.testing.assert_close(scaled[name][0], grad_a, rtol=0, atol=0)
            torch.testing.assert_close(scaled[name][1], grad_b, rtol=0, atol=0)
    assert any(float(step[name][1].abs().max()) > 0 for step in captured[None] for name in step)
