"""Load on the production stack: concurrent submissions and status polls, every job accounted for.

Starts its own stack on loopback (a throw-away PostgreSQL database, a private Redis, the API under
uvicorn, N Celery workers running the real runner on the tiny preset), then:
  1. submit: JOBS jobs from two tenants through CONCURRENCY threads; every job is sent DUPLICATES
     times with the same Idempotency-Key, the copies racing each other;
  2. poll: POLLS status reads (GET /v1/jobs/{id}, and a list every tenth) while the workers drain;
  3. drain: wait until every job has ended (or --time-limit);
  4. account: each key made exactly one job, every job succeeded once (attempts 1, one `started`
     in its events.jsonl), its metric history is exactly steps 1..N, nothing was lost or doubled.
Prints a table and writes JSON. Bounded in count and time; loopback only.

  python bench/load.py                                   # 40 jobs x 3 copies, 2 workers, tiny model
  python bench/load.py --jobs 300 --runner tests.worker.fake_runner   # the service alone, no torch
  python bench/load.py --uploads 3                       # 3 concurrent 100 MiB uploads (bench/uploads.py)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability.conftest import Stack, running_stack  # noqa: E402
from tests.worker import services  # noqa: E402


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=40, help="distinct jobs (Idempotency-Keys)")
    p.add_argument("--duplicates", type=int, default=3, help="submissions per key, concurrent")
    p.add_argument("--concurrency", type=int, default=16, help="client threads")
    p.add_argument("--polls", type=int, default=800, help="status reads during the drain")
    p.add_argument("--workers", type=int, default=2, help="celery worker processes")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per job")
    p.add_argument("--runner", default="akl_core.runner", help="runner module the workers start")
    p.add_argument("--time-limit", type=float, default=420.0, help="give up draining after this long")
    p.add_argument("--models-root", type=Path, default=None, help="default: a temporary one")
    p.add_argument("--uploads", type=int, default=0, help="instead: this many concurrent large uploads")
    p.add_argument("--upload-mib", type=int, default=100, help="size of each upload")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/load.json or uploads.json")
    return p.parse_args(argv)


def _spec(steps: int) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "teacher": "preset:tiny",
        "student": {"init": "truncate", "num_layers": 1},
        "data": {"train": "demo:train", "max_train_examples": 16},
        "training": {"max_steps": steps, "batch_size": 2, "max_length": 48, "max_prompt_length": 32},
        "evaluation": {"num_examples": 0},
        "resources": {"device": "cpu"},
    }
    return spec


def expected_steps(args: argparse.Namespace) -> int:
    # tests.worker.fake_runner (no torch) ignores the spec's training section and runs 10 steps.
    return args.steps if args.runner == "akl_core.runner" else 10


def _stats(latencies: list[float], wall_s: float) -> dict[str, float]:
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"count": len(ms), "p50_ms": q[49], "p95_ms": q[94], "p99_ms": q[98], "max_ms": ms[-1],
            "throughput_per_s": len(ms) / wall_s if wall_s else 0.0}  # fmt: skip


def _run_threads(fn, items: list, concurrency: int) -> tuple[list, float]:
    local = threading.local()

    def call(item):
        return fn(local, item)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(call, items))
    return results, time.perf_counter() - start


def submit_phase(stack: Stack, keys: list[str], args: argparse.Namespace) -> dict[str, Any]:
    spec = _spec(args.steps)
    work = [(i % len(keys), f"load-{i}") for i in range(args.jobs) for _ in range(args.duplicates)]
    # Interleave so that the copies of one key are in flight together.
    work.sort(key=lambda w: (int(w[1].split("-")[1]) // args.concurrency, w[1]))

    def submit(local, item):
        tenant, key = item
        clients = local.__dict__.setdefault("clients", {})
        http = clients.get(tenant) or clients.setdefault(tenant, stack.http(keys[tenant]))
        t0 = time.perf_counter()
        r = http.post("/v1/jobs", json=spec, headers={"Idempotency-Key": key})
        return (
            time.perf_counter() - t0,
            r.status_code,
            key,
            tenant,
            r.json().get("id"),
            r.headers.get("idempotent-replayed"),
        )

    results, wall = _run_threads(submit, work, args.concurrency)
    ids_by_key: dict[tuple[int, str], set[str]] = {}
    for _, status, key, tenant, job_id, _ in results:
        assert status == 201, f"submission answered {status}"
        ids_by_key.setdefault((tenant, key), set()).add(job_id)
    return {
        "latency": _stats([r[0] for r in results], wall),
        "wall_s": wall,
        "requests": len(results),
        "replayed": sum(r[5] == "true" for r in results),
        "ids_by_key": {f"{t}:{k}": sorted(v) for (t, k), v in ids_by_key.items()},
    }


def poll_phase(stack: Stack, keys: list[str], job_ids: list[tuple[int, str]], args) -> dict[str, Any]:
    def poll(local, i):
        tenant, job_id = job_ids[i % len(job_ids)]
        clients = local.__dict__.setdefault("clients", {})
        http = clients.get(tenant) or clients.setdefault(tenant, stack.http(keys[tenant]))
        t0 = time.perf_counter()
        r = http.get("/v1/jobs", params={"limit": 20}) if i % 10 == 9 else http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return time.perf_counter() - t0

    latencies, wall = _run_threads(poll, list(range(args.polls)), args.concurrency)
    return {"latency": _stats(latencies, wall), "wall_s": wall}


def drain_phase(stack: Stack, job_ids: list[str], time_limit: float) -> dict[str, Any]:
    from sqlalchemy import func, select

    from api.db.models import Job

    start = time.monotonic()
    while True:
        with stack.engine.connect() as c:
            left = c.scalar(
                select(func.count()).select_from(Job).where(Job.status.in_(("queued", "running")))
            )
        if not left or time.monotonic() - start > time_limit:
            return {"wall_s": time.monotonic() - start, "unfinished": int(left or 0)}
        time.sleep(1.0)


def account(stack: Stack, submitted: dict[str, Any], steps: int) -> dict[str, Any]:
    """Every key -> one job; every job ran once and completely; nothing extra in the database."""
    from sqlalchemy import func, select

    from api.db.models import Job, JobMetric

    problems: list[str] = []
    for key, ids in submitted["ids_by_key"].items():
        if len(ids) != 1:
            problems.append(f"key {key} made {len(ids)} jobs")
    expected = {i for ids in submitted["ids_by_key"].values() for i in ids}
    with stack.engine.connect() as c:
        rows = c.execute(
            select(
                Job.id,
                Job.status,
                Job.attempts,
                Job.output_dir,
                Job.lease_owner,
                Job.error_code,
                Job.error_message,
            )
        ).all()
        steps_by_job: dict[str, list[int]] = {}
        for job_id, step in c.execute(select(JobMetric.job_id, JobMetric.step).order_by(JobMetric.step)):
            steps_by_job.setdefault(job_id, []).append(step)
        per_key = c.execute(select(Job.tenant_id, Job.idempotency_key, func.count()).group_by(
            Job.tenant_id, Job.idempotency_key)).all()  # fmt: skip
    if {r.id for r in rows} != expected:
        problems.append(f"database has {len(rows)} jobs, {len(expected)} submitted")
    problems += [f"{t}:{k} has {n} rows" for t, k, n in per_key if n != 1]
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r.status] = statuses.get(r.status, 0) + 1
        started = sum(
            json.loads(line).get("type") == "started"
            for line in (Path(r.output_dir) / "events.jsonl").read_text().splitlines()
            if line.strip()
        ) if (Path(r.output_dir) / "events.jsonl").is_file() else 0  # fmt: skip
        if r.status != "succeeded" or r.attempts != 1 or started != 1:
            why = f" ({r.error_code}: {(r.error_message or '')[:300]})" if r.error_code else ""
            problems.append(f"{r.id}: {r.status}, attempts {r.attempts}, started {started} times{why}")
        if steps_by_job.get(r.id) != list(range(1, steps + 1)):
            problems.append(f"{r.id}: metric steps {steps_by_job.get(r.id)}")
    return {"jobs": len(rows), "statuses": statuses, "problems": problems[:50], "ok": not problems}


def _table(result: dict[str, Any]) -> str:
    rows = [("phase", "requests", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s")]
    for phase in ("submit", "poll"):
        s = result[phase]["latency"]
        rows.append((phase, str(s["count"]), f"{s['p50_ms']:.1f}", f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}",
                     f"{s['max_ms']:.1f}", f"{s['throughput_per_s']:.1f}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    d, a = result["drain"], result["accounting"]
    lines.append(
        f"jobs: {a['jobs']} run by {result['config']['workers']} workers, all ended "
        f"{d['since_first_submit_s']:.0f} s after the first submission "
        f"({a['jobs'] / max(d['since_first_submit_s'], 1e-9) * 60:.1f} jobs/min), unfinished {d['unfinished']};\n"
        f"statuses {a['statuses']}; accounted for exactly once: {a['ok']}"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    if not services.postgres_available():
        print("PostgreSQL is not reachable at AKL_TEST_POSTGRES_URL", file=sys.stderr)
        return 2
    from akl_core import models

    def worker_settings(stack: Stack) -> None:
        stack.env.update(AKL_WORKER_RUNNER_MODULE=args.runner, AKL_WORKER_REQUEUE_AFTER_S="60",
                         AKL_WORKER_LEASE_S="30", AKL_WORKER_TICK_S="5")  # fmt: skip

    if args.uploads:
        return upload_main(args)
    with tempfile.TemporaryDirectory(prefix="akl-load-") as tmp:
        root = Path(tmp)
        models_root = args.models_root or root / "models"
        models.prepare_preset(models.TINY, models_root)
        with running_stack(root, models_root, configure=worker_settings) as stack:
            for i in range(args.workers):
                stack.start_worker(f"worker{i}")
            keys = [stack.new_key(f"load-{uuid.uuid4().hex[:6]}") for _ in range(2)]
            began = time.monotonic()
            submitted = submit_phase(stack, keys, args)
            job_ids = [(int(k.split(":")[0]), ids[0]) for k, ids in submitted["ids_by_key"].items()]
            polled = poll_phase(stack, keys, job_ids, args)
            drained = drain_phase(stack, [j for _, j in job_ids], args.time_limit)
            drained["since_first_submit_s"] = time.monotonic() - began
            accounting = account(stack, submitted, expected_steps(args))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    submitted.pop("ids_by_key")
    result = {
        "config": config,
        "submit": submitted,
        "poll": polled,
        "drain": drained,
        "accounting": accounting,
    }
    print(_table(result))
    for problem in accounting["problems"]:
        print("  problem:", problem)
    _write(args.json or REPO / "bench/results/load.json", result)
    return 0 if accounting["ok"] and not drained["unfinished"] else 1


def upload_main(args: argparse.Namespace) -> int:
    """The uploads case: the API alone (no worker), N concurrent uploads, other routes read."""
    from bench import uploads

    with tempfile.TemporaryDirectory(prefix="akl-uploads-") as tmp:
        root = Path(tmp)
        with running_stack(root, root / "models") as stack:
            assert stack.api is not None
            key = stack.new_key(f"uploads-{uuid.uuid4().hex[:6]}")
            result = uploads.run(
                stack.url, key, stack.api.pid, root, uploads=args.uploads, size_mib=args.upload_mib
            )
    result["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(uploads.table(result))
    _write(args.json or REPO / "bench/results/uploads.json", result)
    return 0


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
