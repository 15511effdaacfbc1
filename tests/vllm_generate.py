"""Greedy generation with vllm.LLM for the tests, in a process of its own (vLLM spawns workers).

Usage: python vllm_generate.py SPEC.json RESULT.json, where SPEC holds ``models`` (name -> checkpoint
folder), ``prompts`` (lists of token ids) and ``max_tokens``. RESULT maps each name to ``{"tokens":
[[ids of prompt 0], ...], "logprobs": [[their log-probabilities], ...]}`` or ``{"error": "..."}``; it
is rewritten after every model, so a timeout keeps the finished ones. Exits 1 when any model failed.
With VLLM_ENABLE_V1_MULTIPROCESSING=0 the engine and its worker run in this process (on CPU vLLM
otherwise switches the "uni" executor to "mp"), which saves ~45 s of process starts per model.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path


def generate(model_dir: str, prompts: list[list[int]], max_tokens: int) -> dict[str, list[list]]:
    """vLLM's greedy continuation of each prompt and each chosen token's log-probability.

    EOS is an ordinary token (ignore_eos, no min_tokens).
    """
    from vllm import LLM, SamplingParams

    # Multi-head latent attention (DeepSeek-V3): on a CPU with AMX vLLM picks its AMX kernel, which takes no
    # float32 weights; its reference CPU kernel does.
    mla = "kv_lora_rank" in json.loads((Path(model_dir) / "config.json").read_text())
    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        seed=0,
        distributed_executor_backend="uni",
        **({"attention_backend": "CPU_MLA"} if mla else {}),
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        completions = [out.outputs[0] for out in outputs]
        return {
            "tokens": [list(c.token_ids) for c in completions],
            "logprobs": [[step[t].logprob for t, step in zip(c.token_ids, c.logprobs)] for c in completions],
        }
    finally:
        del llm
        gc.collect()


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    results: dict[str, dict] = {}
    for name, model_dir in spec["models"].items():
        try:
            results[name] = generate(model_dir, spec["prompts"], spec["max_tokens"])
        except Exception:  # noqa: BLE001 - reported per model to the test, which names it
            results[name] = {"error": traceback.format_exc()}
            print(f"[vllm_generate] {name} failed:\n{results[name]['error']}", file=sys.stderr, flush=True)
        Path(result_path).write_text(json.dumps(results))
    return 0 if all("tokens" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
