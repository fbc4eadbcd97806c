#!/usr/bin/env bash
# The main job, end to end on the embedded default (run through `bash run.sh demo`):
#  1. convert the real teacher (SmolLM2-135M-Instruct, from its PyPI wheel) into a safetensors model dir
#  2. start `akl serve` (SQLite + file-system broker + API + one worker) under AKL_DATA_ROOT
#  3. create an API key, upload the demo data and submit an AKL job (examples/demo.yaml) over HTTP
#  4. follow its progress, download the distilled model, and print a generation beside the teacher's
set -euo pipefail
cd "$(dirname "$0")/.."
export AKL_DATA_ROOT=${AKL_DATA_ROOT:-$PWD/.akl}
PORT=${AKL_DEMO_PORT:-8765}
export AKL_URL=http://127.0.0.1:$PORT
mkdir -p "$AKL_DATA_ROOT"
OUT=${AKL_DEMO_OUTPUT:-$PWD/out/demo}

echo "== 1/5 preparing the teacher (once)"
akl models prepare smollm2-135m-instruct

echo "== 2/5 starting the embedded service at $AKL_URL (log: $AKL_DATA_ROOT/serve.log)"
akl serve --port "$PORT" >"$AKL_DATA_ROOT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  python -c "import httpx,sys; sys.exit(httpx.get('$AKL_URL/readyz').status_code != 200)" 2>/dev/null && break
  kill -0 $SERVE_PID 2>/dev/null || { cat "$AKL_DATA_ROOT/serve.log"; exit 1; }
  sleep 1
done
python -c "import httpx; httpx.get('$AKL_URL/readyz').raise_for_status()"

echo "== 3/5 creating an API key and submitting the job (data uploaded through POST /v1/files)"
AKL_API_KEY=$(akl keys create --tenant demo)
export AKL_API_KEY
# The job spec is examples/demo.yaml with its data pointed at the local JSONL files, so that
# `akl submit` uploads them like a user's own data.
SPEC="$AKL_DATA_ROOT/demo-job.yaml"
python - "$SPEC" <<'PY'
import sys, pathlib, yaml
spec = yaml.safe_load(open("examples/demo.yaml"))
demo = pathlib.Path("akl_core/datasets/demo").resolve()
spec["data"]["train"] = str(demo / "train.jsonl")
spec["data"]["validation"] = str(demo / "validation.jsonl")
pathlib.Path(sys.argv[1]).write_text(yaml.safe_dump(spec, sort_keys=False))
PY
JOB=$(akl submit "$SPEC")
echo "job: $JOB"

echo "== 4/5 training (progress, loss and the AKL head/tail gaps)"
akl status "$JOB" --watch
python - "$JOB" <<'PY'
import os, sys, httpx
h = {"Authorization": f"Bearer {os.environ['AKL_API_KEY']}"}
base = f"{os.environ['AKL_URL']}/v1/jobs/{sys.argv[1]}"
m = httpx.get(f"{base}/metrics", headers=h, params={"max_points": 6}).json()["data"]
print("step   loss     g_head   g_tail   w_head")
for r in m:
    print(f"{r['step']:>4}  " + "  ".join(f"{r.get(k) or 0:.4f}" for k in ("loss", "g_head", "g_tail", "w_head")))
for e in httpx.get(f"{base}/evaluations", headers=h).json()["data"]:
    shown = ("rouge_l", "rouge_l_std", "rouge_l_greedy", "teacher_rouge_l", "teacher_rouge_l_greedy", "distinct_2", "val_kl")
    print(f"evaluation @ step {e['step']}:", {k: e["metrics"].get(k) for k in shown})
PY

echo "== 5/5 downloading the distilled model and comparing generations"
rm -rf "$OUT"
MODEL=$(akl download "$JOB" --output "$OUT")
python scripts/compare_generations.py --student "$MODEL" --teacher "$AKL_DATA_ROOT/models/smollm2-135m-instruct"
echo "distilled model: $MODEL"
