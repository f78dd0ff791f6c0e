"""Operator roles, shared by the API, the database layer and the CLI."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """An operator's role; each role may do everything the roles before it may do."""

    READ_ONLY = "read-only"
    DEPLOYER = "deployer"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def includes(self, other: Role) -> bool:
        return self.rank >= other.rank
