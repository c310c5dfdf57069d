#!/usr/bin/env bash
# The GPU checks, in one pass sized for a short lease of a CUDA machine (never part of CI).
#
# Run from the repository root on the GPU machine. It expects what benchmarks/gpu_prepare.sh
# writes here beforehand:
#   .whl/      wheels of the Python packages that machine lacks
#   .gpu/smol/ the bundled model's config and tokenizer files (the 98 MB model file need not
#              travel: the checks train SmolLM2-135M's architecture from random weights)
# and writes its logs under $OUT (default /tmp/gpu-out). Each part has its own time limit
# and a failing part does not stop the next; the whole run ends within $BUDGET seconds.
# ONLY (a regex of part names), BENCH_ONLY (compare.py variants), BENCH_METHODS, PROFILES
# (profile_step.py runs: method[+compile][+python], space-separated) and SUITE (test paths)
# narrow a re-run to what changed.
set -u
OUT=${OUT:-/tmp/gpu-out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
started=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - started))); }
part() {  # part NAME SECONDS COMMAND...: run with a limit, log under $OUT/gpu.log
    local name=$1 limit=$2
    shift 2
    if [[ -n ${ONLY:-} && ! $name =~ $ONLY ]]; then
        return
    fi
    local cap
    cap=$(left)
    ((limit > cap)) && limit=$cap
    if ((limit < 10)); then
        echo "== $name: skipped, out of time" | tee -a "$OUT/gpu.log"
        return
    fi
    echo "== $name (limit ${limit}s, $(date +%T))" | tee -a "$OUT/gpu.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu.log"
    echo "== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/gpu.log"
}

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TUNEPILOT_CACHE=/tmp/tunepilot-cache
if [ "${INSTALL:-1}" = 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD
export TUNEPILOT_TEST_TOKENIZER=$PWD/.gpu/smol
MODEL=/tmp/smollm2-random

part environment 60 bash -c '
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "
import torch, transformers, peft, datasets, pyarrow, trl
from tunepilot.hardware import detect
print(\"torch\", torch.__version__, \"transformers\", transformers.__version__, \"peft\", peft.__version__,
      \"datasets\", datasets.__version__, \"pyarrow\", pyarrow.__version__, \"trl\", trl.__version__)
print(detect())
"'

part "random SmolLM2-135M" 60 python3 -c "
import shutil, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('.gpu/smol'))
model.save_pretrained('$MODEL')
for f in Path('.gpu/smol').iterdir():
    if f.name != 'config.json':
        shutil.copy(f, '$MODEL')
print(sum(p.numel() for p in model.parameters()), 'parameters')
"

part "GPU tests" 90 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/invariants/test_packing.py tests/train/test_allocator.py

part "packed attention" 60 python3 benchmarks/gpu_attention.py

part "tunepilot train, all auto" 120 python3 -m tunepilot train --quiet \
    --set model=$MODEL --set train.max_steps=60 --set train.eval_every=30 \
    --output-dir /tmp/run-auto
cp /tmp/run-auto/plan.json "$OUT/plan.json" 2>/dev/null
tail -n 3 /tmp/run-auto/metrics.jsonl >>"$OUT/gpu.log" 2>/dev/null

part "compare.py, bf16" 240 python3 benchmarks/compare.py --model $MODEL --precision bf16 \
    --steps 30 --methods "${BENCH_METHODS:-lora,full}" --window after-first --json "$OUT/bench.json" \
    --only "${BENCH_ONLY:-default (dynamic padding),group_by_length,padding_free,same settings,auto (own choices)}"

for run in ${PROFILES:-lora}; do  # lora, full, lora+compile, full+python (cProfile)...
    method=${run%%+*}
    flags=()
    [[ $run == *+compile* ]] && flags+=(--compile)
    [[ $run == *+python* ]] && flags+=(--python)
    part "profile of a step, $run" 120 python3 benchmarks/profile_step.py --model $MODEL \
        --method "$method" "${flags[@]}" --steps 10 --rows 30
done

# the slow tests need the bundled model file; test_distributed compares gloo ranks on the CPU
# with one process, which on this machine would train on the GPU
# with the name and outcome of each test in $OUT/suite.log as it finishes, so a run that the
# budget cuts short still names its failures (pytest's summary comes only at the end)
suite_limit=$(($(left) - 10))
part "test suite (not slow)" 600 bash -c "
    timeout $suite_limit python3 -m pytest -v -p no:cacheprovider -m 'not slow' -n 8 \
        --timeout 120 --tb=line --ignore tests/test_distributed.py ${SUITE:-tests} \
        >'$OUT/suite.log' 2>&1
    status=\$?
    grep -E 'FAILED|ERROR| passed| failed|^E ' '$OUT/suite.log' | tail -n 60
    exit \$status"
echo "== done in $(($(date +%s) - started))s" | tee -a "$OUT/gpu.log"
