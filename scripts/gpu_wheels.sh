#!/usr/bin/env bash
# On a machine with network access: download, into .whl/ (or $1), the wheels that scripts/gpu_check.sh
# installs on a GPU machine without network (Python 3.12, x86-64 Linux; the machine's own torch,
# transformers, peft and accelerate are used). Carry the folder with the working tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEST=${1:-.whl}
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
# ms-swift and what it needs that such a machine lacks; deepspeed is a source distribution (built there).
python3 -m pip download -q -d "$DEST" --python-version 3.12 --implementation cp --only-binary=:all: \
    "${platforms[@]}" -c constraints.txt ms-swift==4.6.0 datasets trl modelscope pytest \
    --no-deps
python3 -m pip download -q -d "$DEST" --no-deps --no-binary=:all: deepspeed==0.19.8
python3 -m pip download -q -d "$DEST" --python-version 3.12 --implementation cp --only-binary=:all: \
    "${platforms[@]}" addict attrdict binpacking cpm-kernels dacite json-repair nltk openai oss2 rouge \
    transformers-stream-generator zstandard hjson pydantic pydantic-core annotated-types dill multiprocess \
    modelscope-hub fastapi starlette uvicorn jiter distro crcmod pycryptodome aliyun-python-sdk-core \
    aliyun-python-sdk-kms jmespath typing-inspection --no-deps
du -sh "$DEST"
