"""Tenants and their API keys."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.core.security import NewKey, generate_key, key_prefix, verify_key
from api.db.models import ApiKey, Tenant, utcnow


def get_or_create_tenant(*, session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
    return tenant


def create_key(*, session: Session, tenant_name: str) -> tuple[ApiKey, NewKey]:
    """A new key for ``tenant_name`` (the tenant is created on first use). The caller commits."""
    tenant = get_or_create_tenant(session=session, name=tenant_name)
    new = generate_key()
    row = ApiKey(tenant_id=tenant.id, prefix=new.prefix, key_hash=new.key_hash)
    session.add(row)
    session.flush()
    return row, new


def list_keys(*, session: Session) -> list[tuple[ApiKey, Tenant]]:
    rows = session.execute(select(ApiKey, Tenant).join(Tenant).order_by(ApiKey.id))
    return [(key, tenant) for key, tenant in rows]


def revoke_key(*, session: Session, prefix: str) -> ApiKey | None:
    """Revoke by prefix (or by the whole key); None when no such key exists."""
    prefix = key_prefix(prefix) or prefix
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def authenticate(*, session: Session, key: str) -> Tenant | None:
    """The tenant owning ``key`` if it is valid and not revoked."""
    prefix = key_prefix(key)
    if prefix is None:
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None)))
    if row is None or not verify_key(key, row.key_hash):
        return None
    return session.get(Tenant, row.tenant_id)
