#!/usr/bin/env bash
# Set-up + the test suite (unit tests, then end-to-end swift sft runs incl. DeepSpeed and vLLM on CPU).
#   bash scripts/test.sh           the whole suite, as CI runs it (two pytest workers, one test file each)
#   bash scripts/test.sh --fast    the fast tier for the change-test loop: unit and pure-maths tests, no
#                                  swift sft subprocess, no DeepSpeed, no vLLM (-m "not slow")
# Other arguments go to pytest, e.g. `bash scripts/test.sh tests/test_keys.py -n 0`.
set -euo pipefail
EXTRAS=dev,deepspeed,eval,vllm . "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 USE_HF=1
tier=()
if [ "${1:-}" = "--fast" ]; then
    shift
    tier=(-m "not slow")
fi
ruff check .
python -m pytest -q -rs --durations=30 -n 2 --dist loadfile --no-loadscope-reorder "${tier[@]}" "$@"
