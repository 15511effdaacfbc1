#!/usr/bin/env bash
# Set-up + the test suite (unit tests, then end-to-end swift sft runs incl. DeepSpeed on CPU).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
EXTRAS=dev,deepspeed,eval,vllm . "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 USE_HF=1
ruff check .
python -m pytest -q -rs --durations=30 "$@"
