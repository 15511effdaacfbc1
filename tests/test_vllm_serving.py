"""Pruned checkpoints served by vLLM (CPU): vllm.LLM, the OpenAI server and `swift infer --infer_backend vllm`.

vLLM runs in subprocesses only (it spawns workers, and the test process must stay free of its state);
the machine has 2 cores, so nothing here runs two model processes at once. Tiny models use head_dim 64:
vLLM's CPU attention refuses the 16 of ``create_tiny``'s default models.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import random_lora_grads
from swift_gradpruner.config import GradPruneConfig
from swift_gradpruner.importance import IGIAAccumulator
from swift_gradpruner.prune import prune_model, save_pruned
from swift_gradpruner.report import REPORT_NAME
from swift_gradpruner.tiny import ARCHITECTURES, build_model, pretrain, write_dataset
from swift_run import COMMON, TESTS, check, free_port, report_of, run_dir, swift

if importlib.util.find_spec("vllm") is None:
    pytest.skip(
        "vLLM is not installed (CPU: EXTRAS=vllm bash scripts/setup.sh; GPU: pip install vllm)", allow_module_level=True
    )

NEW_TOKENS = 12
# vLLM and transformers (float32, CPU) differed by <= 2e-6; scaling one down_proj of a pruned model by 0.98
# moved some log-probability by >= 2.5e-3 while the greedy tokens stayed the same.
LOGPROB_ATOL = 1e-4
# vLLM on CPU: ms-swift's vLLM plugin imports torchvision (removed on purpose); 1 GiB of KV cache.
VLLM_ENV = {"VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
# vllm.LLM and swift infer keep the engine in their own process: ~10 s per model instead of ~55 s.
IN_PROCESS_ENV = {**VLLM_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
HEAD_DIM_64 = dict(hidden=128, heads=2, kv_heads=1, intermediate=256)
MIXED = "qwen2-mixed-sliding"
REFUSAL = "Sliding window for some but all layers"


def prompts_of(tokenizer) -> list[list[int]]:
    """Three prompts as token ids: a ChatML question, a plain sentence, two tokens."""
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 plus 7?"}], tokenize=True,
                                         add_generation_prompt=True, return_dict=True)["input_ids"]  # fmt: skip
    plain = tokenizer("Spell the word garden backwards.")["input_ids"]
    return [list(chat), list(plain), list(plain[:2])]


def prune_and_save(model, tokenizer, out_dir: Path) -> dict:
    """GradPruner on random LoRA gradients: remove 2 of 6 layers, one of them merged; return the report."""
    accumulator = IGIAAccumulator()
    for grads in random_lora_grads(model, rank=4, steps=3):
        accumulator.update(grads)
    config = GradPruneConfig(prune_layers=2, merge_layers=1, score="squared", benchmark=False)
    result = prune_model(model, accumulator, config)
    assert len(result.plan.merged) == 1 and len(result.plan.removed) == 2
    save_pruned(model, result, out_dir, tokenizer=tokenizer)
    return result.report


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> tuple[list, list]:
    """transformers' greedy continuations, ``new_tokens`` long, and each chosen token's log-probability.

    EOS is an ordinary token, as with vLLM's ignore_eos: nothing stops or bans it (no min_new_tokens).
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokens, logprobs = [], []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, output_logits=True,
                                 return_dict_in_generate=True)  # fmt: skip
        new = out.sequences[0, len(ids) :].tolist()
        assert len(new) == new_tokens
        tokens.append(new)
        logprobs.append([torch.log_softmax(step[0], -1)[t].item() for step, t in zip(out.logits, new, strict=True)])
    return tokens, logprobs


def vllm_generate(models: dict[str, Path], prompts: list[list[int]], work: Path, timeout: int = 420) -> dict:
    """Run tests/vllm_generate.py on ``models`` in one subprocess; its per-model results plus the log."""
    spec, result = work / "vllm_spec.json", work / "vllm_result.json"
    spec.write_text(json.dumps({"models": {k: str(v) for k, v in models.items()}, "prompts": prompts,
                                "max_tokens": NEW_TOKENS}))  # fmt: skip
    proc = subprocess.Popen([sys.executable, str(TESTS / "vllm_generate.py"), str(spec), str(result)],
                            env={**os.environ, **IN_PROCESS_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0] + f"\n[test] killed after {timeout} s"
    results = json.loads(result.read_text()) if result.is_file() else {}
    assert set(results) == set(models), f"vllm_generate.py rc={proc.returncode}:\n{log[-6000:]}"
    return {"results": results, "log": log}


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    return prompts_of(tokenizer)


@pytest.fixture(scope="module")
def pruned(tokenizer, tmp_path_factory) -> dict[str, dict]:
    """Per architecture: a briefly pretrained 6-layer model, pruned to 4 with one merge, saved."""
    root = tmp_path_factory.mktemp("pruned")
    models = {}
    for arch in ARCHITECTURES:
        model = build_model(arch, num_layers=6, vocab_size=len(tokenizer), **HEAD_DIM_64)
        pretrain(model, tokenizer, steps=30)
        report = prune_and_save(model, tokenizer, root / arch)
        models[arch] = {"dir": root / arch, "report": report}
    return models


@pytest.fixture(scope="module")
def mixed(tokenizer, tmp_path_factory) -> dict:
    """A Qwen2 whose first 3 of 6 layers use full attention and the last 3 a sliding window, pruned to 4."""
    model = build_model("qwen2", num_layers=6, vocab_size=len(tokenizer), use_sliding_window=True, sliding_window=64,
                        max_window_layers=3, **HEAD_DIM_64)  # fmt: skip
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    out_dir = tmp_path_factory.mktemp("mixed") / "model"
    report = prune_and_save(model, tokenizer, out_dir)
    return {"dir": out_dir, "report": report, "model": model.eval()}


@pytest.fixture(scope="module")
def vllm_runs(pruned, mixed, prompts, tmp_path_factory) -> dict:
    """vllm.LLM greedy tokens of every pruned model (the mixed one last: vLLM is expected to refuse it)."""
    models = {arch: info["dir"] for arch, info in pruned.items()} | {MIXED: mixed["dir"]}
    return vllm_generate(models, prompts, tmp_path_factory.mktemp("vllm"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_vllm_generates_what_transformers_generates(arch, pruned, vllm_runs, prompts):
    """vLLM loads the pruned+merged checkpoint and its greedy tokens equal transformers', prompt for prompt."""
    info = pruned[arch]
    assert info["report"]["num_layers_after"] == 4 and len(info["report"]["merged_layers"]) == 1
    assert "vllm_unsupported" not in info["report"]  # uniform attention: nothing stops vLLM
    assert "vllm_unsupported" not in json.loads((info["dir"] / REPORT_NAME).read_text())
    mode = info["dir"].stat().st_mode
    assert mode & 0o005 == 0o005, f"{arch}: checkpoint folder mode {oct(mode)} is not readable by others"
    result = vllm_runs["results"][arch]
    assert "tokens" in result, f"{arch}: vLLM failed:\n{result.get('error')}"
    expected, expected_logprobs = transformers_greedy(info["dir"], prompts)
    assert len({token for tokens in expected for token in tokens}) >= 3, f"{arch}: degenerate model, weak test"
    for i, (got, want) in enumerate(zip(result["tokens"], expected, strict=True)):
        assert got == want, f"{arch}, prompt {i}: vLLM {got} != transformers {want}"
    # Greedy tokens of a barely trained model hardly move when a weight changes; log-probabilities do.
    got_logprobs = torch.tensor(result["logprobs"], dtype=torch.float64)
    want_logprobs = torch.tensor(expected_logprobs, dtype=torch.float64)
    message = f"{arch}: vLLM log-probabilities differ from transformers'"
    torch.testing.assert_close(got_logprobs, want_logprobs, rtol=0, atol=LOGPROB_ATOL, msg=lambda m: f"{message}: {m}")


@pytest.mark.slow
def test_mixed_sliding_qwen2_is_flagged_and_vllm_refuses_it(mixed, vllm_runs, tokenizer, prompts):
    """Mixed sliding/full layers survive pruning; the report says vLLM cannot serve it, and vLLM indeed refuses.

    If a vLLM release starts serving such configs, this fails: then ``serving.vllm_refusal`` should follow.
    """
    config = AutoConfig.from_pretrained(mixed["dir"])
    assert config.num_hidden_layers == 4 and set(config.layer_types) == {"full_attention", "sliding_attention"}
    refusal = json.loads((mixed["dir"] / REPORT_NAME).read_text())["vllm_unsupported"]
    assert refusal == mixed["report"]["vllm_unsupported"]
    assert "sliding_attention" in refusal and "swift infer --infer_backend pt" in refusal

    reloaded = AutoModelForCausalLM.from_pretrained(mixed["dir"], dtype=torch.float32).eval()
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, mixed["model"](ids).logits)
    assert all(len(c) == NEW_TOKENS for c in transformers_greedy(mixed["dir"], prompts)[0])

    result = vllm_runs["results"][MIXED]
    assert "tokens" not in result, "vLLM now serves mixed sliding/full Qwen2: update swift_gradpruner/serving.py"
    assert REFUSAL in result["error"]


def post_json(url: str, body: dict, timeout: int = 120) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"server exited with {server.returncode}:\n{log.read_text()[-6000:]}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"server not healthy after {timeout} s:\n{log.read_text()[-6000:]}")


def stop_group(server: subprocess.Popen, timeout: float = 60) -> bool:
    """SIGTERM to the server's process group; True when every process of the group is gone in time."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(server.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.5)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)
    return False


@pytest.mark.slow
def test_openai_server_completions_match_transformers(pruned, prompts, tokenizer, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` serves the pruned Qwen2; /v1/completions with token-id
    prompts returns transformers' greedy tokens and text; SIGTERM stops the server and its workers."""
    model_dir = pruned["qwen2"]["dir"]
    port = free_port()
    log = tmp_path / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
    ]  # fmt: skip
    with log.open("w") as log_file:
        server = subprocess.Popen(command, env={**os.environ, **VLLM_ENV}, stdout=log_file, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, log)
        answer = post_json(f"http://127.0.0.1:{port}/v1/completions", {
            "model": str(model_dir), "prompt": prompts, "max_tokens": NEW_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "logprobs": 1,
        })  # fmt: skip
    finally:
        stopped = stop_group(server)
    assert stopped and server.returncode is not None, (
        f"server group still alive after SIGTERM:\n{log.read_text()[-3000:]}"
    )
    expected, expected_logprobs = transformers_greedy(model_dir, prompts)
    choices = sorted(answer["choices"], key=lambda choice: choice["index"])
    assert len(choices) == len(prompts)
    for choice, prompt, want, want_logprobs in zip(choices, prompts, expected, expected_logprobs, strict=True):
        assert choice["prompt_token_ids"] == prompt
        assert choice["token_ids"] == want, f"prompt {choice['index']}: server {choice['token_ids']} != {want}"
        assert choice["text"] == tokenizer.decode(want, skip_special_tokens=True)
        assert choice["finish_reason"] == "length"
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(want_logprobs, rel=0, abs=LOGPROB_ATOL)


def greedy_answer(model_dir: Path, question: str, new_tokens: int) -> str:
    """transformers' greedy answer with the checkpoint's ChatML template, stopping at <|im_end|> like swift."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)  # fmt: skip
    out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


QUESTIONS = ["What is 2 plus 3?", "Spell the word stone backwards."]


@pytest.fixture(scope="module")
def swift_base(tokenizer, tmp_path_factory) -> dict:
    """Tiny pretrained Llama and Qwen2 with head_dim 64, saved as HF folders, plus a chat dataset."""
    root = tmp_path_factory.mktemp("swift_base")
    folders = {}
    for arch in ("llama", "qwen2"):
        model = build_model(arch, num_layers=6, vocab_size=len(tokenizer), **HEAD_DIM_64)
        pretrain(model, tokenizer, steps=100)  # 30 steps: the pruned models answer <|im_end|> at once
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        folders[arch] = root / arch
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return {**folders, "data": write_dataset(root / "train.jsonl", 128), "questions": questions}


def gradprune_sft(base: Path, model_type: str, tuner: str, data: Path, out: Path, cwd: Path) -> Path:
    """`swift sft --gradprune true` for 4 steps (phase 1: 3 steps); the phase-2 checkpoint folder."""
    check(swift(
        "sft", "--model", str(base), "--model_type", model_type, "--dataset", str(data), *COMMON,
        "--tuner_type", tuner, "--learning_rate", "1e-4", "--max_steps", "4", "--save_steps", "4",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--output_dir", str(out),
        "--gradprune", "true", "--gradprune_prune_layers", "2", "--gradprune_merge_layers", "1",
        "--gradprune_steps", "3", "--gradprune_score", "squared", "--gradprune_benchmark", "false",
        cwd=cwd,
    ))  # fmt: skip
    report = report_of(out)
    assert report["num_layers_after"] == 4 and len(report["merged_layers"]) == 1
    checkpoint = run_dir(out) / "checkpoint-4"
    assert checkpoint.is_dir()
    return checkpoint


def swift_infer_vllm(model_dir: Path, model_type: str, questions: Path, cwd: Path) -> list[str]:
    """`swift infer --infer_backend vllm` greedy answers (8 new tokens) to ``questions``."""
    answers = cwd / f"answers-{model_dir.name}.jsonl"
    proc = check(swift(
        "infer", "--model", str(model_dir), "--model_type", model_type, "--template", "chatml",
        "--infer_backend", "vllm", "--vllm_max_model_len", "256", "--vllm_enforce_eager", "true",
        "--torch_dtype", "float32", "--max_new_tokens", "8", "--temperature", "0",
        "--val_dataset", str(questions), "--result_path", str(answers),
        cwd=cwd, env=IN_PROCESS_ENV,
    ))  # fmt: skip
    assert "infer_backend='vllm'" in proc.output  # swift has no fallback: vLLM answered (it logs nothing here)
    return [json.loads(line)["response"] for line in answers.read_text().splitlines()]


@pytest.mark.slow
def test_swift_infer_vllm_after_lora_phase_2(swift_base, tmp_path):
    """LoRA phase 2 on the pruned Llama, merged by `swift export`, answered by `swift infer --infer_backend vllm`
    exactly as transformers answers greedily."""
    checkpoint = gradprune_sft(swift_base["llama"], "llama", "lora", swift_base["data"], tmp_path / "out", tmp_path)
    assert (checkpoint / "adapter_model.safetensors").is_file()
    merged = tmp_path / "merged"
    check(swift("export", "--adapters", str(checkpoint), "--merge_lora", "true", "--output_dir", str(merged),
                cwd=tmp_path))  # fmt: skip
    assert AutoConfig.from_pretrained(merged).num_hidden_layers == 4
    responses = swift_infer_vllm(merged, "llama", swift_base["questions"], tmp_path)
    assert len(responses) == len(QUESTIONS) and all(responses)
    assert responses == [greedy_answer(merged, q, 8) for q in QUESTIONS]


@pytest.mark.slow
def test_swift_infer_vllm_after_full_phase_2(swift_base, tmp_path):
    """Full fine-tuning phase 2 on the pruned Qwen2: its checkpoint, answered by `swift infer --infer_backend vllm`
    exactly as transformers answers greedily."""
    checkpoint = gradprune_sft(swift_base["qwen2"], "qwen2", "full", swift_base["data"], tmp_path / "out", tmp_path)
    assert not (checkpoint / "adapter_model.safetensors").exists()
    assert json.loads((checkpoint / "args.json").read_text())["tuner_type"] == "full"
    assert AutoConfig.from_pretrained(checkpoint).num_hidden_layers == 4
    responses = swift_infer_vllm(checkpoint, "qwen2", swift_base["questions"], tmp_path)
    assert len(responses) == len(QUESTIONS) and all(responses)
    assert responses == [greedy_answer(checkpoint, q, 8) for q in QUESTIONS]
