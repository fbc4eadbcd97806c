#!/usr/bin/env bash
# The GPU kit (issue 15, section 4): one command, at most 8 minutes on one GPU.
#
#   bash bench/gpu.sh                 # on a machine with CUDA
#   bash bench/gpu.sh --cpu-dry-run   # every stage at toy sizes on CPU (Triton interpreter)
#
# Stages, each under its own timeout; a failing stage does not stop the next ones:
#   1. the `gpu`-marked tests (tests/akl_core/test_gpu.py): bf16 autocast, fused AdamW, the
#      fused loss and the Triton kernel against the PyTorch path on CUDA, 2-process DDP (2 GPUs);
#   2. divergence fwd+bwd at BT 8192 x H 4096 x V 128256, bf16 (bench/gpu_divergences.py):
#      ours (Triton, PyTorch) against Liger-Kernel's fused linear JSD / KL, ms and peak GB;
#   3. one distillation step against TRL's GKDTrainer (bench/train_step.py) with a randomly
#      initialised teacher of SmolLM2-135M's shape (bench/random_teacher.py).
# Writes bench/results/gpu-<stamp>.json (the summary, rewritten after every stage) beside each
# stage's own JSON. Python packages the machine lacks (pydantic, liger-kernel, trl, datasets)
# must be on PYTHONPATH; from the repository root, run from any directory.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1
# the interpreter: $PYTHON, else python3 when it has torch, else the project's .venv (CPU dry runs)
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && ! "$PY" -c "import torch" >/dev/null 2>&1 && [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
fi
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "bench/gpu.sh: $PY cannot import torch; run with PYTHON=/path/to/a/python/with/torch" >&2
    exit 2
fi
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RES=bench/results
mkdir -p "$RES"
SUMMARY="$RES/gpu-$STAMP.json"
WORK=$(mktemp -d)  # the stage log and the tests' junit XML
STAGES="$WORK/stages.txt"
JUNIT="$WORK/tests.xml"
: >"$STAGES"
T_START=$(date +%s)
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to a machine without a registry (README)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi

summarize() {
    "$PY" - "$SUMMARY" "$STAGES" "$RES" "$STAMP" "$DRY" "$JUNIT" <<'EOF'
import json, platform, sys, xml.etree.ElementTree as ET
from pathlib import Path
summary, stages, res, stamp, dry, junit = sys.argv[1:]
out = {"stamp": stamp, "cpu_dry_run": dry == "1", "stages": {}}
for line in Path(stages).read_text().splitlines():
    name, rc, secs = line.split()
    out["stages"][name] = {"rc": int(rc), "seconds": int(secs)}
try:
    import torch
    out["torch"] = torch.__version__
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import triton
    out["triton"] = triton.__version__
except Exception as exc:
    out["env_error"] = str(exc)
junit = Path(junit)
if junit.is_file():
    cases = ET.parse(junit).getroot().iter("testcase")
    tests = {"passed": [], "failed": [], "skipped": []}
    for c in cases:
        tag = {ch.tag for ch in c}
        kind = "failed" if tag & {"failure", "error"} else "skipped" if "skipped" in tag else "passed"
        tests[kind].append(f"{c.get('classname', '').split('.')[-1]}::{c.get('name')}")
    out["tests"] = {k: len(v) for k, v in tests.items()} | {"failed_names": tests["failed"]}
for key, name in (("divergences", "divergences"), ("train_step", "train-step")):
    p = Path(res) / f"gpu-{stamp}-{name}.json"
    if p.is_file():
        out[key] = json.loads(p.read_text())
Path(summary).write_text(json.dumps(out, indent=1))
EOF
}

stage() {  # stage NAME SECONDS COMMAND...: run under a timeout, record rc and time, rewrite the summary
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "=== stage $name (limit ${limit}s) at $(($(date +%s) - T_START))s"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "=== stage $name: rc $rc in $(($(date +%s) - t0))s"
    echo "$name $rc $(($(date +%s) - t0))" >>"$STAGES"
    summarize
}

"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

if [ "$DRY" = 1 ]; then
    export AKL_TRITON=1 TRITON_INTERPRET=1  # the kernel on CPU tensors, interpreted
    stage tests 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/akl_core/test_gpu.py \
        --junitxml="$JUNIT"
    stage divergences 300 "$PY" bench/gpu_divergences.py --small --device cpu \
        --json "$RES/gpu-$STAMP-divergences.json"
    unset AKL_TRITON TRITON_INTERPRET
    stage train-step 300 "$PY" bench/train_step.py --teacher preset:tiny --layers 1 --batch 2 \
        --seq-len 64 --steps 1 --warmup 1 --repeats 1 --device cpu --json "$RES/gpu-$STAMP-train-step.json"
else
    stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/akl_core/test_gpu.py \
        --timeout 120 --junitxml="$JUNIT"
    stage divergences 200 "$PY" bench/gpu_divergences.py --json "$RES/gpu-$STAMP-divergences.json"
    MODELS=$(mktemp -d)
    stage train-step 120 bash -c "'$PY' bench/random_teacher.py '$MODELS' smollm2-135m-shape >/dev/null 2>&1 &&
        '$PY' bench/train_step.py --teacher smollm2-135m-shape --models-root '$MODELS' --layers 6 \
        --batch 8 --seq-len 512 --steps 5 --warmup 2 --repeats 1 --json '$RES/gpu-$STAMP-train-step.json'"
    rm -rf "$MODELS"
fi
echo "=== done in $(($(date +%s) - T_START))s; summary $SUMMARY"
"$PY" - "$SUMMARY" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({k: v for k, v in s.items() if k not in ("divergences", "train_step")}, indent=1))
EOF
