"""Handler discovery: which `handlers/<module>.py` router answers each tenant.

Apart from `router.py` on purpose: routing is pure and imports no config; finding the modules
the config names is a start-up concern (the app factory and `check-config` use it).
"""

from __future__ import annotations

import importlib
import re

from alfred_bot.config import Config, ConfigError
from alfred_bot.router import Router


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
