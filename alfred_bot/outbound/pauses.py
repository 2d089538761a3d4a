"""Which tenants' sends are held, and why: the pause state behind one small interface.

Today the board lives in this process (`LocalPauses`). Issue 16 shares it across nodes (a 190 on
one node pauses the tenant on every node), which only needs another `PauseBoard`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import msgspec


class Pause(msgspec.Struct, frozen=True):
    """Why a tenant's sends are held: `token` lifts itself when a probe succeeds, `account` does not."""

    kind: str
    reason: str
    code: int | None
    since: float


class PauseBoard(Protocol):
    """Where pauses are kept."""

    def current(self) -> Mapping[str, Pause]:
        """Every paused tenant and its pause."""

    def hold(self, tenant: str, pause: Pause) -> bool:
        """Pause `tenant` unless it is already paused (the first reason is kept); True if it was not."""

    def lift(self, tenant: str) -> bool:
        """End `tenant`'s pause; False if it was not paused."""


class LocalPauses:
    """The pause board of a single process."""

    def __init__(self) -> None:
        self._pauses: dict[str, Pause] = {}

    def current(self) -> dict[str, Pause]:
        return self._pauses

    def hold(self, tenant: str, pause: Pause) -> bool:
        if tenant in self._pauses:
            return False
        self._pauses[tenant] = pause
        return True

    def lift(self, tenant: str) -> bool:
        return self._pauses.pop(tenant, None) is not None
