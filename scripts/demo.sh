#!/usr/bin/env bash
# Set-up + the main job: swift sft --gradprune true on a tiny embedded Llama (offline, CPU, ~2 min).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
export HF_HUB_OFFLINE=1 USE_HF=1
gradprune demo "$@"
