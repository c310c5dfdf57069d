#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a GPU machine that reaches no package index:
#   .whl/      wheels (CPython 3.12, manylinux x86-64) of the packages that machine lacks, at
#              the versions this checkout's .venv runs (so both machines run the same code)
#   .gpu/smol/ the bundled model's config and tokenizer (the model file itself is 98 MB)
# Both folders are git-ignored. Run from the repository root after `make setup`.
#
#   PYVER=3.12 PACKAGES="transformers peft ..." benchmarks/gpu_prepare.sh
set -euo pipefail
PYVER=${PYVER:-3.12}
# what the image of this workplace's GPU machines lacks, or has at other versions (read there
# on 2026-11-27: torch 2.11 with transformers 5.17 and no datasets, optuna, gguf or trl)
PACKAGES=${PACKAGES:-"transformers peft accelerate datasets dill multiprocess xxhash fsspec gguf
trl optuna alembic SQLAlchemy Mako colorlog"}
BIN=.venv/bin
mkdir -p .whl .gpu/smol
for name in $PACKAGES; do
    version=$($BIN/python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -z "$version" ]; then
        echo "$name is not installed in .venv (make setup; make bench for trl)" >&2
        exit 1
    fi
    $BIN/python -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
        --python-version "$PYVER" --implementation cp --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "$name==$version"
done
$BIN/python - <<'EOF'
import shutil
from pathlib import Path

from tunepilot.model import local_dir, resolve

source = Path(local_dir(resolve("smollm2-135m-instruct")))
for f in source.iterdir():
    if f.name != "model.safetensors":
        shutil.copy(f, ".gpu/smol")
EOF
du -sh .whl .gpu
echo "carry [.whl, .gpu] and run: bash benchmarks/gpu_check.sh"
