"""Client commands: ``akl submit``, ``akl status``, ``akl download`` - HTTP to ``AKL_URL`` with
``AKL_API_KEY`` (docs/architecture.md#settings). Nothing here imports torch or the service."""

from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import httpx
import typer

from akl_core.data import BUILTIN_DATASETS  # torch-free at import

TERMINAL = ("succeeded", "failed", "cancelled")
DATA_FIELDS = {"train": "train", "validation": "validation"}  # spec field -> upload purpose
SHOWN_METRICS = ("loss", "ce", "kd", "g_head", "g_tail", "w_head", "fkl", "rkl", "lr", "tokens_per_s")

Url = Annotated[str, typer.Option("--url", envvar="AKL_URL", help="service URL")]
ApiKey = Annotated[str, typer.Option("--api-key", envvar="AKL_API_KEY", help="API key", show_default=False)]


class ClientError(Exception):
    pass


def client(url: str, api_key: str, timeout: float = 60.0) -> httpx.Client:
    if not api_key:
        raise typer.BadParameter("set AKL_API_KEY (create one with `akl keys create --tenant NAME`)")
    return httpx.Client(
        base_url=url.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
    )


def check(response: httpx.Response) -> Any:
    """The JSON body, or ClientError with the service's message."""
    if response.is_success:
        return response.json()
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text[:500]
    raise ClientError(f"HTTP {response.status_code}: {detail}")


# -- submit --------------------------------------------------------------------------------------
def upload_data_files(http: httpx.Client, spec: dict[str, Any], base_dir: Path) -> dict[str, str]:
    """Upload each local JSONL file the spec's ``data`` names and put its file id in its place.
    Built-in (``demo:...``, ``jargon:...``) and ``file-...`` references are left as they are. Returns {field: file id}."""
    data = spec.get("data") or {}
    uploaded: dict[str, str] = {}
    for field, purpose in DATA_FIELDS.items():
        ref = data.get(field)
        if not isinstance(ref, str) or ref.startswith(("file-", *(f"{name}:" for name in BUILTIN_DATASETS))):
            continue
        path = Path(ref).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ClientError(f"data.{field}: {ref} is not a file (relative paths are read from {base_dir})")
        with open(path, "rb") as f:
            body = check(http.post("/v1/files", files={"file": (path.name, f)}, data={"purpose": purpose}))
        data[field] = uploaded[field] = body["id"]
    return uploaded


def submit_spec(http: httpx.Client, spec_path: Path, idempotency_key: str | None = None) -> dict[str, Any]:
    import yaml

    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict):
        raise ClientError(f"{spec_path}: expected a YAML mapping")
    upload_data_files(http, spec, spec_path.resolve().parent)
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    return check(http.post("/v1/jobs", json=spec, headers=headers))


# -- status --------------------------------------------------------------------------------------
def _metrics_line(job: dict[str, Any]) -> str:
    metrics = job.get("metrics") or {}
    parts = [f"{k}={metrics[k]:.4g}" for k in SHOWN_METRICS if isinstance(metrics.get(k), (int, float))]
    return "  ".join(parts)


def _describe(job: dict[str, Any]) -> str:
    total = job.get("total_steps") or "?"
    line = f"{job['id']}  {job['status']}  step {job.get('current_step', 0)}/{total}"
    if isinstance(job.get("eta_seconds"), int):
        line += f"  eta {_duration(job['eta_seconds'])}"
    if job.get("error"):
        line += f"\n  error {job['error']['code']}: {job['error']['message']}"
    metrics = _metrics_line(job)
    return line + (f"\n  {metrics}" if metrics else "")


def _duration(seconds: int) -> str:
    minutes, secs = divmod(max(0, seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def watch(http: httpx.Client, job_id: str, interval: float = 2.0) -> dict[str, Any]:
    """A progress bar with the latest loss and AKL gaps until the job ends."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(job_id, total=None, metrics="")
        while True:
            job = check(http.get(f"/v1/jobs/{job_id}"))
            metrics = _metrics_line(
                {
                    "metrics": {
                        k: (job.get("metrics") or {}).get(k) for k in ("loss", "g_head", "g_tail", "w_head")
                    }
                }
            )
            if isinstance(job.get("eta_seconds"), int):
                metrics = f"eta {_duration(job['eta_seconds'])}  {metrics}"
            progress.update(
                task, description=f"{job_id} {job['status']}", completed=job.get("current_step") or 0,
                total=job.get("total_steps"), metrics=metrics,
            )  # fmt: skip
            if job["status"] in TERMINAL:
                return job
            time.sleep(interval)


# -- teacher caches ------------------------------------------------------------------------------
def build_cache(http: httpx.Client, spec: dict[str, Any], interval: float = 2.0) -> dict[str, Any]:
    """``POST /v1/teacher_caches`` with ``spec``, then a progress bar until the build ends; the
    final cache object (raises ClientError unless it succeeded). The bar goes to stderr, so a
    script can capture what it prints."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cache = check(http.post("/v1/teacher_caches", json=spec))
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(cache["id"], total=1.0)
        while cache["status"] not in TERMINAL:
            time.sleep(interval)
            cache = check(http.get(f"/v1/teacher_caches/{cache['id']}"))
            progress.update(task, description=f"{cache['id']} {cache['status']}", completed=cache["progress"])
    if cache["status"] != "succeeded":
        raise ClientError(f"cache {cache['id']} {cache['status']}: {cache.get('error')}")
    return cache


# -- download ------------------------------------------------------------------------------------
def _safe_member(member: tarfile.TarInfo) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith(("/", "\\")) or ".." in name.parts:
        raise ClientError(f"refusing archive member with an unsafe path: {member.name!r}")
    if not (member.isfile() or member.isdir()):
        raise ClientError(f"refusing archive member that is not a plain file or folder: {member.name!r}")


def safe_extract(archive: Path, output: Path) -> list[str]:
    """Unpack a (gzipped) tar into ``output``, refusing absolute paths, '..', links and devices.
    Every member is checked before anything is written."""
    with tarfile.open(archive, mode="r:*") as tar:
        members = tar.getmembers()
        for member in members:
            _safe_member(member)
        output.mkdir(parents=True, exist_ok=True)
        tar.extractall(output, members=members, filter="data")
    return [m.name for m in members]


def download_archive(http: httpx.Client, job_id: str, checkpoint: str | None, output: Path) -> Path:
    path = f"/v1/jobs/{job_id}/checkpoints/{checkpoint}/content" if checkpoint else f"/v1/jobs/{job_id}/model"
    with tempfile.TemporaryDirectory(prefix="akl-download-") as tmp:
        archive = Path(tmp) / "archive.tar.gz"
        with http.stream("GET", path, timeout=httpx.Timeout(60.0, read=600.0)) as response:
            if not response.is_success:
                response.read()
                check(response)
            with open(archive, "wb") as f:
                for chunk in response.iter_bytes(1 << 20):
                    f.write(chunk)
        names = safe_extract(archive, output)
    tops = {PurePosixPath(n).parts[0] for n in names if n}
    return output / tops.pop() if len(tops) == 1 else output


# -- commands ------------------------------------------------------------------------------------
def _fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(1)


def submit(
    spec: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="job spec (YAML)")],
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
    idempotency_key: Annotated[str | None, typer.Option(help="submit at most once per key")] = None,
    follow: Annotated[bool, typer.Option("--watch", help="then show progress until the job ends")] = False,
) -> None:
    """Upload the local data files SPEC names, submit the job and print its id."""
    try:
        with client(url, api_key) as http:
            job = submit_spec(http, spec, idempotency_key)
            typer.echo(job["id"])
            if follow:
                job = watch(http, job["id"])
                typer.echo(_describe(job))
    except (ClientError, httpx.HTTPError) as exc:
        _fail(exc)


def status(
    job_id: Annotated[str | None, typer.Argument(help="a job id; without it, list recent jobs")] = None,
    follow: Annotated[bool, typer.Option("--watch", help="progress bar until the job ends")] = False,
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
) -> None:
    """Show a job (progress, latest loss and AKL gaps g_head / g_tail / w_head) or list jobs."""
    try:
        with client(url, api_key) as http:
            if job_id is None:
                for job in check(http.get("/v1/jobs", params={"limit": 20}))["data"]:
                    typer.echo(_describe(job))
                return
            job = watch(http, job_id) if follow else check(http.get(f"/v1/jobs/{job_id}"))
            typer.echo(_describe(job))
            if follow and job["status"] != "succeeded":
                raise typer.Exit(1)
    except (ClientError, httpx.HTTPError) as exc:
        _fail(exc)


def download(
    job_id: Annotated[str, typer.Argument(help="job id")],
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="a checkpoint id; default: final model")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="folder to unpack into")] = Path("."),
    url: Url = "http://127.0.0.1:8000",
    api_key: ApiKey = "",
) -> None:
    """Download the final model (or a checkpoint) and unpack it safely into OUTPUT."""
    try:
        with client(url, api_key) as http:
            folder = download_archive(http, job_id, checkpoint, output)
    except (ClientError, httpx.HTTPError, tarfile.TarError) as exc:
        _fail(exc)
    typer.echo(str(folder))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `akl` app."""
    app.command("submit")(submit)
    app.command("status")(status)
    app.command("download")(download)
