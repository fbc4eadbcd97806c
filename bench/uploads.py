"""Uploads under load: N concurrent large JSONL uploads while other routes are read.

Used by ``python bench/load.py --uploads 3`` (the stack comes from there). Measures the API
process's resident memory (sampled every 20 ms; growth = peak - before), each upload's wall time
and MB/s (upload + validation + fsync), and the latency of other routes (GET /v1/jobs,
/v1/files, /healthz in turn) during the uploads. Goals (RELIABILITY.md, "Uploads in bounded
memory"): growth <= ~64 MiB per upload, >= 20 MB/s, other routes' p99 < 200 ms.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

MiB = 1024 * 1024


def make_jsonl(path: Path, size: int) -> Path:
    """A valid prompt/response file of about ``size`` bytes (1 KiB lines, all distinct)."""
    filler = "x" * 960
    with open(path, "w", encoding="utf-8") as f:
        written, i = 0, 0
        while written < size - 1100:
            line = f'{{"prompt": "q{i:09d}", "response": "{filler}"}}\n'
            f.write(line)
            written += len(line)
            i += 1
    return path


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.02):
        import psutil

        super().__init__(daemon=True)
        self.proc, self.every_s = psutil.Process(pid), every_s
        self.before = self.peak = self.proc.memory_info().rss
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.every_s):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak - self.before


def run(url: str, key: str, api_pid: int, workdir: Path, *, uploads: int, size_mib: int) -> dict[str, Any]:
    from bench.load import _stats  # the table's percentile helper

    payload = make_jsonl(workdir / "big.jsonl", size_mib * MiB - 64 * 1024)  # under the 100 MiB limit
    headers = {"Authorization": f"Bearer {key}"}
    done = threading.Event()
    latencies: list[float] = []

    def read_other_routes() -> None:
        paths = ["/v1/jobs", "/v1/files", "/healthz"]
        with httpx.Client(base_url=url, headers=headers, timeout=30) as http:
            i = 0
            while not done.is_set():
                t0 = time.perf_counter()
                assert http.get(paths[i % 3]).status_code == 200
                latencies.append(time.perf_counter() - t0)
                i += 1
                time.sleep(0.02)

    def upload(_: int) -> tuple[float, int]:
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http, open(payload, "rb") as f:
            t0 = time.perf_counter()
            r = http.post("/v1/files", files={"file": ("big.jsonl", f)}, data={"purpose": "train"})
            assert r.status_code == 201, r.text[:500]
            return time.perf_counter() - t0, r.json()["num_examples"]

    sampler = RssSampler(api_pid)
    sampler.start()
    reader = threading.Thread(target=read_other_routes, daemon=True)
    reader.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(uploads) as pool:
        results = list(pool.map(upload, range(uploads)))
    wall = time.perf_counter() - t0
    done.set()
    reader.join()
    growth = sampler.stop()
    size = payload.stat().st_size
    return {
        "uploads": uploads,
        "bytes_each": size,
        "wall_s": wall,
        "seconds_each": [r[0] for r in results],
        "mb_per_s_each": [size / 1e6 / r[0] for r in results],
        "examples_each": results[0][1],
        "rss_before_mib": sampler.before / MiB,
        "rss_growth_mib": growth / MiB,
        "rss_growth_per_upload_mib": growth / MiB / uploads,
        "other_routes": _stats(latencies, wall),
    }


def table(result: dict[str, Any]) -> str:
    o = result["other_routes"]
    return (
        f"{result['uploads']} concurrent uploads of {result['bytes_each'] / MiB:.0f} MiB: "
        f"{min(result['mb_per_s_each']):.1f}-{max(result['mb_per_s_each']):.1f} MB/s each "
        f"(wall {result['wall_s']:.1f} s); API RSS {result['rss_before_mib']:.0f} MiB, "
        f"+{result['rss_growth_mib']:.0f} MiB peak ({result['rss_growth_per_upload_mib']:.0f} MiB per upload)\n"
        f"other routes during the uploads: {o['count']} requests, p50 {o['p50_ms']:.1f} ms, "
        f"p99 {o['p99_ms']:.1f} ms, max {o['max_ms']:.1f} ms"
    )
