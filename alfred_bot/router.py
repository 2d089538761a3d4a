"""Routers: how bot logic in `handlers/` declares which messages and status events it answers.

A message handler is `async def handler(message, ctx) -> None`. `Router.handle` runs one message:
routes are tried in the order they were declared and the first whose filters all match runs. By
default that ends routing; a handler that returns `CONTINUE` lets the next matching route run too.
When no route ran to the end, a text message goes to the text fallback (the orchestrator, when
`[orchestrator] url` is set), anything else to `@router.default`. Middleware (`router.use`) wraps
the whole handling of a message once (all of the above), the first added outermost.

The dispatcher does not run a bot's router as declared: it runs `router.mount(...)`, a view of the
same routes with the built-in middleware (consent, then the inbound limit) outside the bot's own
and the orchestrator as text fallback, so the rules above are all in this one module.

A status handler is `async def handler(status, ctx) -> None` for delivery updates of messages we
sent (`sent`, `delivered`, `read`, `played`, `failed`); every matching status route runs.

Dialogs: `@router.state("awaiting_time")` (or `state=` on the other decorators) matches only while
the user's conversation state (`ctx.state`) is at that step; `None` means "in no dialog". Routes
without a state filter match at any step. `handle` reads the state once, before routing.

Replies go through `ctx`, which buffers them; the dispatcher writes them to the outbox in the same
transaction that marks the message handled.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from alfred_bot.models import (
    ButtonMessage,
    InteractiveMessage,
    Message,
    ReactionMessage,
    Status,
    TextMessage,
    UnknownMessage,
)
from alfred_bot.text import command_of

if TYPE_CHECKING:
    from alfred_bot.context import Context, StatusContext


class _Continue:
    def __repr__(self) -> str:
        return "CONTINUE"


#: Return this from a handler to let the next matching route run as well.
CONTINUE: Final = _Continue()

Handler = Callable[[Message, "Context"], Awaitable[Any]]
StatusHandler = Callable[[Status, "StatusContext"], Awaitable[Any]]
Next = Callable[[], Awaitable[Any]]
Middleware = Callable[[Message, "Context", Next], Awaitable[Any]]
Filter = Callable[[Message], bool]


class _AnyStep:
    def __repr__(self) -> str:
        return "ANY_STEP"


#: `state=ANY_STEP` (the default of every decorator): the route matches whatever the dialog step.
ANY_STEP: Final = _AnyStep()
#: The `state=` of a decorator: a step, None (no dialog), several of those, or ANY_STEP.
Steps = str | None | Sequence[str | None] | _AnyStep


@dataclass(frozen=True, slots=True)
class Route:
    """One handler and the filters that must all accept a message."""

    handler: Handler
    filters: tuple[Filter, ...]
    steps: frozenset[str | None] | None = None  # None: any step

    def matches(self, message: Message, step: str | None = None) -> bool:
        if self.steps is not None and step not in self.steps:
            return False
        return all(accept(message) for accept in self.filters)


def _steps(state: Steps) -> frozenset[str | None] | None:
    if isinstance(state, _AnyStep):
        return None
    if state is None or isinstance(state, str):
        return frozenset({state})
    return frozenset(state)


def _pattern(value: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    return re.compile(value) if isinstance(value, str) else value


def _of_types(types: tuple[str, ...]) -> Filter:
    """Messages of these types; never one kept with a parse error (it is routed like an unknown
    type, to the default), so a `text` handler never gets a text without its text."""
    wanted = frozenset(types)
    return lambda m: m.type in wanted and not _broken(m)


def _broken(message: Message) -> bool:
    return isinstance(message, UnknownMessage) and message.parse_error is not None


def _text_matches(pattern: re.Pattern[str]) -> Filter:
    return lambda m: m.text is not None and pattern.search(m.text) is not None


def _value_matches(
    get: Callable[[Message], str | None], values: tuple[str, ...], pattern: re.Pattern[str] | None
) -> Filter:
    wanted = frozenset(values)

    def accept(message: Message) -> bool:
        value = get(message)
        if value is None:
            return False
        if pattern is not None and pattern.search(value) is None:
            return False
        return not wanted or value in wanted

    return accept


def _reply_id(message: Message) -> str | None:
    return message.reply_id if isinstance(message, InteractiveMessage) else None


def _payload(message: Message) -> str | None:
    return message.button.payload if isinstance(message, ButtonMessage) else None


def _call_permission(message: Message) -> str | None:
    return message.call_permission_response


def _emoji(message: Message) -> str | None:
    return (message.reaction.emoji or "") if isinstance(message, ReactionMessage) else None


class Router:
    """Ordered routes, status routes, middleware and an optional catch-all; `handle` runs a message."""

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._routes: list[Route] = []
        self._status_routes: list[tuple[frozenset[str], StatusHandler]] = []
        self._middleware: list[Middleware] = []
        self._default: Handler | None = None
        self._outer: tuple[Middleware, ...] = ()  # built-in middleware, set by `mount`
        self._text_fallback: Handler | None = None

    # ------------------------------------------------------------------ declaring

    def route(self, *filters: Filter, state: Steps = ANY_STEP) -> Callable[[Handler], Handler]:
        """Route messages accepted by every filter (a function of the message), at the dialog
        step(s) `state` (`None`: outside any dialog; default: any step)."""
        steps = _steps(state)

        def register(handler: Handler) -> Handler:
            self._routes.append(Route(handler, filters, steps))
            return handler

        return register

    def state(self, *steps: str | None) -> Callable[[Handler], Handler]:
        """Any message while the user's dialog is at one of `steps` (`None`: in no dialog)."""
        if not steps:
            raise ValueError("state() needs at least one step (None: no dialog)")
        return self.route(state=steps)

    def message(
        self, *types: str, text: str | re.Pattern[str] | None = None, state: Steps = ANY_STEP
    ) -> Callable[[Handler], Handler]:
        """Messages of these `types` (any, if none) whose text matches the regex `text`, if given."""
        filters: list[Filter] = [_of_types(types)] if types else []
        pattern = _pattern(text)
        if pattern is not None:
            filters.append(_text_matches(pattern))
        return self.route(*filters, state=state)

    def command(self, *names: str, state: Steps = ANY_STEP) -> Callable[[Handler], Handler]:
        """Text messages whose first word is one of `names`, with or without '/', any case.

        `@router.command("help")` answers "/help", "help" and "HELP me"; `ctx.command_args` holds
        the rest of the text.
        """
        wanted = frozenset(n.removeprefix("/").lower() for n in names)
        if not wanted:
            raise ValueError("command() needs at least one name")

        def accept(message: Message) -> bool:
            parsed = command_of(message.text) if message.type == "text" else None
            return parsed is not None and parsed[0] in wanted

        return self.route(accept, state=state)

    def interactive(
        self, *ids: str, pattern: str | re.Pattern[str] | None = None, state: Steps = ANY_STEP
    ) -> Callable[[Handler], Handler]:
        """Taps on our reply buttons or list rows, by their `id` (any, if none given)."""
        return self.route(_value_matches(_reply_id, ids, _pattern(pattern)), state=state)

    def button(self, *payloads: str, pattern: str | re.Pattern[str] | None = None) -> Callable[[Handler], Handler]:
        """Taps on a template's quick-reply button, by its `payload` (any, if none given)."""
        return self.route(_value_matches(_payload, payloads, _pattern(pattern)))

    def call_permission(self, *responses: str) -> Callable[[Handler], Handler]:
        """The user's answer to our call permission request: `"accept"` or `"reject"` (any, if none given)."""
        return self.route(_value_matches(_call_permission, responses, None))

    def reaction(self, *emojis: str) -> Callable[[Handler], Handler]:
        """Reactions to our messages, optionally only these emojis ("" is a removed reaction)."""
        return self.route(_value_matches(_emoji, emojis, None))

    def status(self, *states: str) -> Callable[[StatusHandler], StatusHandler]:
        """Delivery updates of messages we sent: `sent`, `delivered`, `read`, `played`, `failed`."""

        def register(handler: StatusHandler) -> StatusHandler:
            self._status_routes.append((frozenset(states), handler))
            return handler

        return register

    def default(self, handler: Handler) -> Handler:
        """Register the catch-all handler, run when no route handled the message."""
        self._default = handler
        return handler

    def use(self, middleware: Middleware) -> Middleware:
        """Wrap the handling of each message: `async def mw(message, ctx, call_next)`; first added is outermost."""
        self._middleware.append(middleware)
        return middleware

    def mount(self, *, outer: Sequence[Middleware] = (), text_fallback: Handler | None = None) -> Router:
        """This router as the dispatcher runs it: `outer` middleware around the bot's own (the first
        outermost) and `text_fallback` for the texts no route claims.

        A view, never a change: the bot's routes, status routes and middleware are shared (one
        declared later still counts), while the router in `handlers/` stays as declared, so one
        module can serve several tenants and apps, each with its own built-ins.
        """
        mounted = copy.copy(self)
        mounted._outer = (*self._outer, *outer)
        mounted._text_fallback = text_fallback or self._text_fallback
        return mounted

    # ------------------------------------------------------------------ resolving

    @property
    def wants_statuses(self) -> bool:
        return bool(self._status_routes)

    def handlers_for(self, message: Message, step: str | None = None) -> list[Handler]:
        """The handlers of every matching route at dialog `step`, in declaration order."""
        return [route.handler for route in self._routes if route.matches(message, step)]

    def fallback_for(self, message: Message) -> Handler | None:
        """Who answers a message no route ran to the end: a text goes to the text fallback
        (the orchestrator) when there is one, anything else to `@router.default` (if any)."""
        if self._text_fallback is not None and isinstance(message, TextMessage):
            return self._text_fallback
        return self._default

    def status_handlers(self, status: Status) -> list[StatusHandler]:
        return [h for states, h in self._status_routes if not states or status.status in states]

    # ------------------------------------------------------------------ running

    async def handle(self, message: Message, ctx: Context) -> None:
        """Run one message: the middleware once (built-in first, then the bot's, first added
        outermost) around the matching routes in order while they return `CONTINUE`, then the fallback."""
        await ctx.load_state()
        run: Handler = self._route
        for middleware in reversed((*self._outer, *self._middleware)):
            run = _wrap_one(middleware, run)
        await run(message, ctx)

    async def _route(self, message: Message, ctx: Context) -> None:
        for handler in self.handlers_for(message, ctx.state.step):
            if await handler(message, ctx) is not CONTINUE:
                return
        fallback = self.fallback_for(message)
        if fallback is not None:
            await fallback(message, ctx)


def _wrap_one(middleware: Middleware, inner: Handler) -> Handler:
    async def call(message: Message, ctx: Context) -> Any:
        return await middleware(message, ctx, lambda: inner(message, ctx))

    return call
