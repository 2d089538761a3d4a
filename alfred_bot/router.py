"""Routers: how bot logic in `handlers/` declares which messages it answers.

A handler is `async def handler(message, ctx) -> None`. Routes are tried in the order they were
declared; the first whose filters all match runs, and no other does. `@router.default` runs when
nothing else matched. A handler replies through `ctx`, which buffers the replies; the dispatcher
writes them to the outbox in the same transaction that marks the message handled.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alfred_bot.config import Config, ConfigError
from alfred_bot.models import Message

if TYPE_CHECKING:
    from alfred_bot.context import Context

Handler = Callable[[Message, "Context"], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """One handler and its filters; an empty filter matches everything."""

    handler: Handler
    types: frozenset[str]
    pattern: re.Pattern[str] | None

    def matches(self, message: Message) -> bool:
        if self.types and message.type not in self.types:
            return False
        if self.pattern is None:
            return True
        text = message.text
        return text is not None and self.pattern.search(text) is not None


class Router:
    """An ordered list of routes plus an optional catch-all."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._routes: list[Route] = []
        self._default: Handler | None = None

    def message(self, *types: str, text: str | re.Pattern[str] | None = None) -> Callable[[Handler], Handler]:
        """Route messages of these `types` (any, if none) whose text matches `text` (a regex)."""
        pattern = re.compile(text) if isinstance(text, str) else text

        def register(handler: Handler) -> Handler:
            self._routes.append(Route(handler, frozenset(types), pattern))
            return handler

        return register

    def default(self, handler: Handler) -> Handler:
        """Register the catch-all handler, run when no route matched."""
        self._default = handler
        return handler

    def resolve(self, message: Message) -> Handler | None:
        """The handler that answers `message`, or None when nothing does."""
        for route in self._routes:
            if route.matches(message):
                return route.handler
        return self._default


def load_router(module: str, key: str) -> Router:
    """Import `handlers.<module>` and return its `router`; errors name the config `key`."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", module):
        raise ConfigError(f"{key}: {module!r} is not a module name in handlers/")
    try:
        mod = importlib.import_module(f"handlers.{module}")
    except ModuleNotFoundError as exc:
        raise ConfigError(f"{key}: no module handlers/{module}.py ({exc})") from None
    router = getattr(mod, "router", None)
    if not isinstance(router, Router):
        raise ConfigError(f"{key}: handlers/{module}.py has no `router = Router(...)`")
    return router


def routers_for(cfg: Config) -> dict[str, Router]:
    """One router per tenant, as chosen by `tenants.NAME.handler` or `handlers.default`."""
    routers: dict[str, Router] = {}
    for name, tenant in cfg.tenants.items():
        key = f"tenants.{name}.handler" if tenant.handler else "handlers.default"
        routers[name] = load_router(cfg.handler_for(name), key)
    return routers
