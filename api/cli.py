"""Service commands: ``akl keys create|list|revoke`` and ``akl migrate``; see docs/architecture.md."""

from __future__ import annotations

from typing import Annotated

import typer

keys_app = typer.Typer(help="Manage API keys (stored hashed; a key is shown once).", no_args_is_help=True)


def _session():
    from api.core.config import Settings
    from api.db.session import get_engine, migrate, session_factory

    settings = Settings()
    migrate(settings.database_url)  # keys need the tables; upgrading an up-to-date DB is a no-op
    return session_factory(get_engine(settings.database_url))()


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option("--tenant", help="tenant name (created on first use)")],
) -> None:
    """Create an API key for TENANT and print it (only this once)."""
    from api.crud import api_keys

    name = tenant.strip()
    if not name or len(name) > 128:
        raise typer.BadParameter("tenant name must be 1..128 characters", param_hint="--tenant")
    with _session() as session:
        row, new = api_keys.create_key(session=session, tenant_name=name)
        session.commit()
    typer.echo(new.key)
    typer.echo(f"created key {row.prefix} for tenant {name}; store it now, it is not shown again", err=True)


@keys_app.command("list")
def keys_list() -> None:
    """List keys: prefix, tenant, created, revoked (never the secret)."""
    from api.crud import api_keys

    with _session() as session:
        rows = api_keys.list_keys(session=session)
    typer.echo(f"{'PREFIX':<14} {'TENANT':<24} {'CREATED':<26} REVOKED")
    for key, tenant in rows:
        revoked = key.revoked_at.isoformat(timespec="seconds") if key.revoked_at else "-"
        typer.echo(
            f"{key.prefix:<14} {tenant.name:<24} {key.created_at.isoformat(timespec='seconds'):<26} {revoked}"
        )


@keys_app.command("revoke")
def keys_revoke(
    prefix: Annotated[str, typer.Argument(help="the key's prefix (see `akl keys list`) or the key")],
) -> None:
    """Revoke a key; requests with it get 401 from now on."""
    from api.crud import api_keys

    with _session() as session:
        row = api_keys.revoke_key(session=session, prefix=prefix)
        session.commit()
    if row is None:
        typer.echo(f"no key with prefix {prefix!r}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {row.prefix}")


def migrate_command() -> None:
    """Upgrade the database (AKL_DATABASE_URL) to the newest schema."""
    from api.core.config import Settings
    from api.db.session import migrate

    settings = Settings()
    migrate(settings.database_url)
    typer.echo("database is at the newest schema")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `akl` app."""
    app.add_typer(keys_app, name="keys")
    app.command("migrate")(migrate_command)
