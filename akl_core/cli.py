"""Typer commands; see docs/architecture.md.

  akl distill SPEC.yaml [--output DIR] [--no-resume]   run a job locally with a progress bar
  akl eval MODEL_DIR [--data demo:test] [--teacher REF]  evaluate a model directory
  akl models prepare NAME [--force]                    create a preset under the models root
  akl cache build SPEC.yaml [--output DIR]             store a teacher's top-k over a data set
  akl cache info DIR|cache:NAME [--verify]             a cache's manifest in brief
Heavy imports (torch, transformers) stay inside the commands.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.progress import TaskID

models_app = typer.Typer(help="Model presets and the local models root.", no_args_is_help=True)
cache_app = typer.Typer(
    help="Teacher caches: a teacher's top-k, stored once for many students.", no_args_is_help=True
)


def _console():
    from rich.console import Console

    return Console(stderr=True)


class _ProgressView:
    """Renders run events: a rich progress bar for steps, one line for other events."""

    def __init__(self, console, label: str = "distill"):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.progress = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.description}"),
            console=console,
        )
        self.task: TaskID | None = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "started":
            self.task = self.progress.add_task(
                "", total=event["total_steps"], completed=event["resumed_from_step"]
            )
            self.console.print(
                f"training on {event['device']}: {event['num_train_examples']} examples, "
                f"{event['total_steps']} steps (resumed from {event['resumed_from_step']})"
            )
        elif kind == "step" and self.task is not None:
            desc = (
                f"loss {event['loss']:.4f} ce {event['ce']:.4f} kd {event['kd']:.4f} "
                f"w_head {event['w_head']:.2f} {event['tokens_per_s']:.0f} tok/s"
            )
            self.progress.update(self.task, completed=event["step"], description=desc)
        elif kind == "eval":
            teacher = event.get("teacher_rouge_l")
            ref = f" (teacher {teacher:.2f})" if isinstance(teacher, float) else ""
            self.console.print(
                f"eval @ step {event['step']}: rouge_l {event['rouge_l']:.2f} "
                f"± {event['rouge_l_std']:.2f}{ref}, distinct-2 {event['distinct_2']:.3f}, "
                f"val_ce {event['val_ce']:.4f}, val_kl {event['val_kl']:.4f}"
            )
        elif kind in ("checkpoint", "log", "stopped", "completed", "error"):
            body = {k: v for k, v in event.items() if k != "type"}
            style = "red" if kind == "error" else "cyan"
            self.console.print(f"[{style}]{kind}[/{style}] {json.dumps(body)}")


def distill_command(
    spec: Annotated[Path, typer.Argument(help="job spec (YAML or JSON)", exists=True, dir_okay=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="output directory")] = None,
    resume: Annotated[bool, typer.Option(help="continue from the newest checkpoint in the output")] = True,
) -> None:
    """Run a distillation spec locally and write the output directory."""
    from akl_core.events import DistillError
    from akl_core.runner import EXIT_STOPPED, load_spec_file

    console = _console()
    try:
        job = load_spec_file(spec)
    except DistillError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from exc
    output = output or Path("runs") / spec.stem
    output.mkdir(parents=True, exist_ok=True)
    if job.resources.processes > 1:
        raise typer.Exit(_distill_subprocess(spec, output, resume, console))
    from transformers.utils import logging as hf_logging

    from akl_core.trainer import distill

    hf_logging.disable_progress_bar()
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print("[yellow]stopping after this step (Ctrl-C again to abort)[/yellow]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _ProgressView(console) as view:
            result = distill(job, output, on_event=view, should_stop=lambda: stop["requested"], resume=resume)
    except DistillError as exc:
        raise typer.Exit(1) from exc
    finally:
        signal.signal(signal.SIGINT, previous)
    if result["status"] == "stopped":
        raise typer.Exit(EXIT_STOPPED)
    console.print(f"done: {output / 'final'}")
    typer.echo(json.dumps(result["metrics"], indent=2))


def _distill_subprocess(spec: Path, output: Path, resume: bool, console) -> int:
    """Several processes: the runner launches torchrun; its JSON lines drive the progress bar."""
    cmd = [
        sys.executable,
        "-m",
        "akl_core.runner",
        str(spec),
        str(output),
        "--resume" if resume else "--no-resume",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        with _ProgressView(console) as view:
            for line in proc.stdout:
                try:
                    view(json.loads(line))
                except (json.JSONDecodeError, KeyError, TypeError):
                    console.print(line.rstrip())
    except KeyboardInterrupt:
        proc.terminate()  # SIGTERM: the runner checkpoints and exits 3
    return proc.wait()


def eval_command(
    model_dir: Annotated[Path, typer.Argument(help="a model directory (e.g. OUTPUT/final)", exists=True)],
    data: Annotated[str, typer.Option(help="JSONL path or demo:SPLIT")] = "demo:test",
    data_format: Annotated[
        str, typer.Option("--format", help="auto, dolly, prompt_response, messages")
    ] = "auto",
    teacher: Annotated[str | None, typer.Option(help="teacher reference, for val_kl and its Rouge-L")] = None,
    num_examples: Annotated[int, typer.Option(help="examples to generate for")] = 32,
    seeds: Annotated[str, typer.Option(help="comma-separated sampling seeds")] = "10,20,30,40,50",
    max_new_tokens: Annotated[int, typer.Option()] = 64,
    batch_size: Annotated[int, typer.Option()] = 8,
    max_length: Annotated[int, typer.Option()] = 256,
    max_prompt_length: Annotated[int, typer.Option()] = 128,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    output_json: Annotated[Path | None, typer.Option("--json", help="also write the metrics here")] = None,
) -> None:
    """Evaluate a model directory: Rouge-L over seeds, distinct-n, validation CE (and KL)."""
    import torch
    from transformers import AutoModelForCausalLM

    from akl_core import data as data_mod
    from akl_core import evaluation, models
    from akl_core.spec import EvaluationSpec

    spec = EvaluationSpec(
        num_examples=num_examples,
        seeds=[int(s) for s in seeds.split(",") if s.strip()],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    tokenizer = models.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    # transformers wraps PreTrainedModel.to with functools.wraps(nn.Module.to): mypy sees an unbound call
    model = model.to(device)  # type: ignore[arg-type]
    examples = data_mod.read_examples(data, data_format, None)
    teacher_model, vocab = None, None
    if teacher is not None:
        t_path = models.resolve_model_ref(teacher)
        models.check_tokenizers(models.load_tokenizer(t_path), tokenizer)
        teacher_model = models.load_teacher(t_path, device=device)
        vocab = models.common_vocab_size(teacher_model, model, tokenizer)
    metrics = evaluation.evaluate_model(
        model,
        tokenizer,
        examples,
        spec,
        teacher=teacher_model,
        vocab_size=vocab,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        device=device,
        cache_dir=None,
    )
    text = json.dumps(metrics, indent=2)
    if output_json is not None:
        output_json.write_text(text)
    typer.echo(text)


@models_app.command("prepare")
def prepare_command(
    name: Annotated[str, typer.Argument(help="preset: tiny or smollm2-135m-instruct")],
    force: Annotated[bool, typer.Option(help="rebuild even if present")] = False,
) -> None:
    """Create a preset model under the models root (AKL_MODELS_ROOT)."""
    from akl_core import models

    try:
        path = models.prepare_preset(name, force=force)
    except models.ModelError as exc:
        _console().print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    typer.echo(str(path))


@cache_app.command("build")
def cache_build_command(
    spec: Annotated[Path, typer.Argument(help="cache spec (YAML or JSON)", exists=True, dir_okay=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="cache directory (default: CACHES_ROOT/SPEC_STEM)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="keep the finished shards of an interrupted build")] = True,
) -> None:
    """Run the teacher over the data once and store its top-k per response token."""
    from akl_core.cache_runner import load_cache_spec_file
    from akl_core.cache_spec import default_caches_root
    from akl_core.events import DistillError
    from akl_core.runner import EXIT_STOPPED

    console = _console()
    try:
        cache_spec = load_cache_spec_file(spec)
    except DistillError as exc:
        console.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(2) from exc
    root = default_caches_root()
    output = output or root / spec.stem
    from transformers.utils import logging as hf_logging

    from akl_core.cache_builder import build_cache

    hf_logging.disable_progress_bar()
    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        console.print("[yellow]stopping: finished shards are kept (Ctrl-C again to abort)[/yellow]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with _CacheProgressView(console, "cache") as view:
            result = build_cache(
                cache_spec, output, on_event=view, should_stop=lambda: stop["requested"], resume=resume
            )
    except DistillError as exc:
        raise typer.Exit(1) from exc
    finally:
        signal.signal(signal.SIGINT, previous)
    if result["status"] == "stopped":
        raise typer.Exit(EXIT_STOPPED)
    ref = _cache_ref(output, root)
    console.print(f"done: {output}" + (f" (a job's teacher: {ref})" if ref else ""))


def _cache_ref(path: Path, root: Path) -> str | None:
    """``cache:NAME`` when ``path`` lies inside the caches root."""
    try:
        return "cache:" + path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


class _CacheProgressView(_ProgressView):
    """The progress bar of a cache build: shards done, tokens/s."""

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "started":
            self.task = self.progress.add_task(
                "", total=event["total_shards"], completed=event["resumed_shards"]
            )
            self.console.print(
                f"caching top-{event['top_k']} of {event['vocab_size']} on {event['device']}: "
                f"{event['num_examples']} examples, {event['total_tokens']} response tokens, "
                f"{event['total_shards']} shards ({event['resumed_shards']} already done)"
            )
        elif kind == "shard" and self.task is not None:
            desc = f"{event['split']} {event['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=event["done_shards"], description=desc)
        elif kind == "teacher_eval":
            self.console.print(
                f"teacher rouge_l {event['rouge_l']:.2f} ± {event['rouge_l_std']:.2f} "
                f"on {event['num_examples']} validation prompts"
            )
        elif kind != "shard":
            super().__call__(event)


@cache_app.command("info")
def cache_info_command(
    cache: Annotated[str, typer.Argument(help="a cache directory, or cache:NAME under the caches root")],
    verify: Annotated[bool, typer.Option(help="check every shard's size and sha256")] = False,
    output_json: Annotated[bool, typer.Option("--json", help="print the whole manifest as JSON")] = False,
) -> None:
    """Show a cache's teacher, k, size and bytes per token (and check its shards)."""
    from akl_core.cache_spec import is_cache_ref, read_manifest, resolve_cache_ref

    console = _console()
    try:
        path = resolve_cache_ref(cache) if is_cache_ref(cache) else Path(cache)
        manifest = read_manifest(path)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    if verify:
        from akl_core.events import DistillError
        from akl_core.teacher_cache import open_cache

        try:
            open_cache(path, verify=True)
        except DistillError as exc:
            console.print(f"[red]{exc.code}: {exc.message}[/red]")
            raise typer.Exit(1) from exc
    if output_json:
        typer.echo(manifest.model_dump_json(indent=2))
        return
    m = manifest
    lines = [
        f"cache       {path}",
        f"teacher     {m.teacher} (weights sha256 {m.teacher_weights_sha256[:12]}, {m.teacher_dtype})",
        f"top_k       {m.top_k} of {m.vocab_size} ({m.id_dtype} ids, {m.logprob_dtype} log-probs)",
        f"lengths     max_length {m.max_length}, max_prompt_length {m.max_prompt_length}",
    ]
    for name, split in m.splits.items():
        lines.append(f"{name:<11} {split.data}: {split.examples} examples, {split.tokens} tokens")
    lines.append(f"size        {m.bytes} bytes in {len(m.shards)} shards, {m.bytes_per_token:.1f} B/token")
    if m.teacher_eval:
        lines.append(
            f"teacher     rouge_l {m.teacher_eval['rouge_l']:.2f} on {m.teacher_eval['num_examples']} prompts"
        )
    if verify:
        lines.append("verified    every shard's size and sha256 match the manifest")
    typer.echo("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `akl` app."""
    app.command("distill")(distill_command)
    app.command("eval")(eval_command)
    app.add_typer(models_app, name="models")
    app.add_typer(cache_app, name="cache")
