"""The `akl` command: core commands (distill, eval, models), service commands (serve, keys,
migrate) and client commands (submit, status, download). Heavy imports stay inside commands."""

from __future__ import annotations

import typer

app = typer.Typer(help="akl-distill: distill LLMs with Adaptive KL.", no_args_is_help=True)


def _register() -> None:
    from akl_cli import client, serve
    from akl_core import cli as core_cli
    from api import cli as api_cli

    core_cli.register(app)
    api_cli.register(app)
    serve.register(app)
    client.register(app)


_register()

if __name__ == "__main__":
    app()
