#!/usr/bin/env bash
# The main job, end to end on the embedded default (run through `bash run.sh demo`):
#  1. convert the real teacher (SmolLM2-135M-Instruct, from its PyPI wheel) into a safetensors model dir
#  2. start `akl serve` (SQLite + file-system broker + API + one worker) under AKL_DATA_ROOT
#  3. create an API key and upload the demo data (POST /v1/files), as chat messages
#  4. build a teacher cache over HTTP (POST /v1/teacher_caches): the teacher runs once, top-64 kept
#  5. distill from it (teacher: cache:<id>, examples/demo.yaml): progress, validation KL before and
#     after, the AKL gap history
#  6. download the distilled model and print its greedy continuations beside the teacher's
# Each stage prints its wall time and the machine's load (`uptime`).
set -euo pipefail
cd "$(dirname "$0")/.."
export AKL_DATA_ROOT=${AKL_DATA_ROOT:-$PWD/.akl}
PORT=${AKL_DEMO_PORT:-8765}
export AKL_URL=http://127.0.0.1:$PORT
mkdir -p "$AKL_DATA_ROOT"
OUT=${AKL_DEMO_OUTPUT:-$PWD/out/demo}
SPEC=examples/demo.yaml
TEACHER=smollm2-135m-instruct

STAGE_START=$SECONDS
stage_done() {  # wall time of the stage just finished, and the load beside it
  echo "   [$1: $((SECONDS - STAGE_START)) s; load $(uptime | sed 's/.*load average: //')]"
  STAGE_START=$SECONDS
}

echo "== 1/6 preparing the teacher (converted once, then reused)"
akl models prepare "$TEACHER"
stage_done "teacher"
DEMO_START=$SECONDS

echo "== 2/6 starting the embedded service at $AKL_URL (log: $AKL_DATA_ROOT/serve.log)"
akl serve --port "$PORT" >"$AKL_DATA_ROOT/serve.log" 2>&1 &
SERVE_PID=$!
trap 'kill -TERM $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  python -c "import httpx,sys; sys.exit(httpx.get('$AKL_URL/readyz').status_code != 200)" 2>/dev/null && break
  kill -0 $SERVE_PID 2>/dev/null || { cat "$AKL_DATA_ROOT/serve.log"; exit 1; }
  sleep 1
done
python -c "import httpx; httpx.get('$AKL_URL/readyz').raise_for_status()"
stage_done "service"

echo "== 3/6 creating an API key and uploading the demo data (POST /v1/files)"
AKL_API_KEY=$(akl keys create --tenant demo)
export AKL_API_KEY
# Only the examples the job reads (data.max_train_examples / max_validation_examples: one epoch
# of max_steps x batch_size) are uploaded, so the teacher runs over nothing the student never sees.
# $AKL_DATA_ROOT/demo-job.json is the job spec (examples/demo.yaml) with its data as file ids.
python - "$SPEC" "$AKL_DATA_ROOT" <<'PY'
import json, os, pathlib, sys, yaml
from akl_cli.client import client, upload_data_files
from akl_core.data import read_examples
from akl_core.formats import as_chat
spec = yaml.safe_load(open(sys.argv[1]))
root = pathlib.Path(sys.argv[2]) / "demo-data"
root.mkdir(parents=True, exist_ok=True)
d = spec["data"]
for split in ("train", "validation"):  # in the chat format: see examples/demo.yaml
    examples = read_examples(f"demo:{split}", limit=d.pop(f"max_{split}_examples"))
    lines = [json.dumps({"messages": as_chat(ex).messages}) + "\n" for ex in examples]
    (root / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    d[split] = str(root / f"{split}.jsonl")
with client(os.environ["AKL_URL"], os.environ["AKL_API_KEY"]) as http:
    for field, file_id in upload_data_files(http, spec, root).items():
        print(f"{field}: {file_id} ({sum(1 for _ in open(root / f'{field}.jsonl'))} examples)")
(pathlib.Path(sys.argv[2]) / "demo-job.json").write_text(json.dumps(spec, indent=2))
PY
stage_done "upload"

echo "== 4/6 building the teacher cache (POST /v1/teacher_caches, top_k 64): the teacher runs once"
# The cache holds what the job needs from the teacher: the data, the length settings, and its
# evaluation settings (the teacher's Rouge-L line is scored once, at build time).
CACHE=$(python - "$AKL_DATA_ROOT/demo-job.json" <<'PY'
import json, os, sys
from akl_cli.client import build_cache, client
job = json.load(open(sys.argv[1]))
d, t = job["data"], job["training"]
spec = {
    "teacher": job["teacher"],
    "data": {
        "train": d["train"],
        "validation": d["validation"],
        "max_length": t["max_length"],
        "max_prompt_length": t["max_prompt_length"],
    },
    "top_k": 64,
    "evaluation": job["evaluation"],
}
with client(os.environ["AKL_URL"], os.environ["AKL_API_KEY"]) as http:
    cache = build_cache(http, spec)
print(
    f"cache {cache['id']}: {cache['examples']} examples, {cache['tokens']} response tokens, "
    f"{cache['bytes'] / 1e6:.1f} MB, {cache['bytes_per_token']:.0f} bytes/token "
    f"(dense fp16 logits would be {2 * 49152 / 1e3:.0f} KB/token)",
    file=sys.stderr,
)
print(cache["id"])
PY
)
stage_done "cache"

echo "== 5/6 distilling from the cache (teacher: cache:$CACHE; progress, loss and the AKL gaps)"
JOB=$(python - "$AKL_DATA_ROOT/demo-job.json" "$CACHE" <<'PY'
import json, os, sys
from akl_cli.client import check, client
job = json.load(open(sys.argv[1]))
job["teacher"] = f"cache:{sys.argv[2]}"
with client(os.environ["AKL_URL"], os.environ["AKL_API_KEY"]) as http:
    print(check(http.post("/v1/jobs", json=job))["id"])
PY
)
echo "job: $JOB"
akl status "$JOB" --watch
python - "$JOB" <<'PY'
import os, sys, httpx
h = {"Authorization": f"Bearer {os.environ['AKL_API_KEY']}"}
base = f"{os.environ['AKL_URL']}/v1/jobs/{sys.argv[1]}"
m = httpx.get(f"{base}/metrics", headers=h, params={"max_points": 6}).json()["data"]
print("gap history:\nstep   loss     g_head   g_tail   w_head")
for r in m:
    print(f"{r['step']:>4}  " + "  ".join(f"{r.get(k) or 0:.4f}" for k in ("loss", "g_head", "g_tail", "w_head")))
evals = sorted(httpx.get(f"{base}/evaluations", headers=h).json()["data"], key=lambda e: e["step"])
for e in evals:
    shown = ("val_kl", "val_ce", "rouge_l", "rouge_l_greedy", "teacher_rouge_l", "teacher_rouge_l_greedy", "distinct_2")
    print(f"evaluation @ step {e['step']}:", {k: e["metrics"].get(k) for k in shown})
before, after = evals[0]["metrics"]["val_kl"], evals[-1]["metrics"]["val_kl"]
print(f"validation KL(teacher || student): {before:.3f} before training (step 0) -> {after:.3f} after")
PY
stage_done "distill"

echo "== 6/6 downloading the distilled model and comparing greedy continuations"
rm -rf "$OUT"
MODEL=$(akl download "$JOB" --output "$OUT")
python scripts/compare_generations.py --chat --student "$MODEL" --teacher "$AKL_DATA_ROOT/models/$TEACHER" \
  --max-prompt-length "$(python -c "import yaml; print(yaml.safe_load(open('$SPEC'))['training']['max_prompt_length'])")"
echo "distilled model: $MODEL"
stage_done "download + generations"
echo "== demo done in $((SECONDS - DEMO_START)) s after the teacher step; load $(uptime | sed 's/.*load average: //')"
