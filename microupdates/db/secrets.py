"""The secret store: values that recipes reference as ${secret:NAME}. Values are read only to hand jobs to devices."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from microupdates.db.models import Secret, utc_now
from microupdates.errors import InvalidRequestError, NotFoundError
from microupdates.protocol.secret_references import SECRET_NAME_PATTERN


@dataclass
class SecretView:
    """A secret's name and dates; the value is never part of it."""

    name: str
    created_at: datetime
    updated_at: datetime


def set_secret(session: Session, name: str, value: str) -> bool:
    """Insert or replace a secret; return True when it is new."""

    check_secret_name(name)
    row = session.get(Secret, name)
    if row is None:
        session.add(Secret(name=name, value=value))
        return True
    row.value = value
    row.updated_at = utc_now()
    return False


def list_secrets(session: Session) -> list[SecretView]:
    return [
        SecretView(name=row.name, created_at=row.created_at, updated_at=row.updated_at)
        for row in session.scalars(select(Secret).order_by(Secret.name))
    ]


def delete_secret(session: Session, name: str) -> None:
    row = session.get(Secret, name)
    if row is None:
        raise NotFoundError(f"Secret {name!r} not found.")
    session.delete(row)


def missing_secret_names(session: Session, names: list[str]) -> list[str]:
    if not names:
        return []
    known = set(session.scalars(select(Secret.name).where(Secret.name.in_(names))))
    return [name for name in names if name not in known]


def load_secret_values(session: Session, names: list[str]) -> dict[str, str]:
    """Return the values of the named secrets that exist, by name."""

    if not names:
        return {}
    return {row.name: row.value for row in session.scalars(select(Secret).where(Secret.name.in_(names)))}


def check_secret_name(name: str) -> str:
    if not SECRET_NAME_PATTERN.match(name):
        raise InvalidRequestError(
            f"{name!r} is not a valid secret name: use 1-64 letters, digits or '_', not starting with a digit."
        )
    return name
