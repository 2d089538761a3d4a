"""The outbound facade: outbox → pump → per-number lanes → Graph API → retry policy → outbox.

`Sender` wires the parts and is what the app, the API and the status page use: start, stop,
wake, pauses, resume, queue depths and counts (a read-only view of `Telemetry.sender`). The parts:
`pump.Pump` claims due rows into lanes and records outcomes; `lanes.Lane` / `lanes.LaneWorkers` pace
and send; `policy.RetryPolicy` decides what each answer means; `pauses.PauseBoard` holds which
tenants wait and why.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from alfred_bot.config import Config
from alfred_bot.graph import Transport
from alfred_bot.outbound.lanes import Lane, LaneWorkers
from alfred_bot.outbound.pauses import LocalPauses, Pause, PauseBoard
from alfred_bot.outbound.policy import PauseOrder, RetryPolicy
from alfred_bot.outbound.pump import Pump
from alfred_bot.outbound.redis import LocalPacer, SharedPacing
from alfred_bot.store import Outbox, Settlement
from alfred_bot.tasks import stop_workers
from alfred_bot.telemetry import Telemetry

log = logging.getLogger("alfred.sender")

PRUNE_EVERY = 60.0


class Sender:
    """Delivers the outbox of every tenant, paced per number."""

    def __init__(
        self,
        store: Outbox,
        transport: Transport,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        token_groups: Mapping[str, str] | None = None,
        telemetry: Telemetry | None = None,
        pauses: PauseBoard | None = None,
    ) -> None:
        self._out = cfg.outbound
        self._clock = clock
        self._monotonic = monotonic
        self._transport = transport
        # Tenants that send with the same access token: a token error pauses all of them.
        self._token_groups = dict(token_groups or {})
        self._pauses = pauses or LocalPauses()
        tenants = cfg.tenants.items()
        self._lanes = {name: Lane.local(name, t.phone_number_id, self._out, monotonic) for name, t in tenants}
        self.workers = sum(lane.workers for lane in self._lanes.values())
        self._telemetry = telemetry or Telemetry(cfg.tenants)
        counts = self._telemetry.sender
        lease = _lease(cfg, self._lanes.values())
        self._pump = Pump(store, self._lanes, self._pauses, counts, clock=clock, monotonic=monotonic, lease=lease)
        policy = RetryPolicy(self._out, rng or random.Random())  # noqa: S311 (jitter, not crypto)
        self._crew = LaneWorkers(
            self._pump,
            transport,
            policy,
            self._pauses,
            telemetry=self._telemetry,
            clock=clock,
            monotonic=monotonic,
            on_pause=self._pause,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._pacing: SharedPacing | None = None

    def share_pacing(self, pacing: SharedPacing) -> None:
        """Pace every number through Redis, with every other node (issue 16): each lane books its
        starts and recipients' budgets there, and pauses are shared. Call before `start`, which
        starts `pacing` (stop closes it)."""
        self._pacing = pacing
        out = self._out
        for lane in self._lanes.values():
            lane.limiter = pacing.pacer(lane.tenant, lane.phone_number_id, out.rate_per_second)
            lane.pairs = pacing.pairs(
                lane.tenant, lane.phone_number_id, burst=out.pair_burst, interval=out.pair_interval_seconds
            )
        self._pauses = self._pump.pauses = self._crew.pauses = pacing.pauses

    @property
    def pacing(self) -> SharedPacing | None:
        """The shared pacing, when Redis is configured."""
        return self._pacing

    def lane_modes(self) -> dict[str, str]:
        """Per tenant: `local` (no Redis), `shared` (booked in Redis) or `fallback` (Redis away)."""
        return {name: lane.mode for name, lane in self._lanes.items()}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, hold: float = 0.0) -> None:
        """Start the workers; the first send only after `hold` s (see `Pump.run`)."""
        if self._pacing is not None:
            await self._pacing.start()  # the pause board is loaded before the first send
        for lane in self._lanes.values():
            self._tasks += [
                asyncio.create_task(self._crew.run(lane), name=f"alfred-sender-{lane.tenant}-{i}")
                for i in range(lane.workers)
            ]
        self._tasks.append(asyncio.create_task(self._pump.run(hold), name="alfred-pump"))
        self._tasks.append(asyncio.create_task(self._housekeeping(), name="alfred-probe"))

    async def stop(self, grace: float = 5.0) -> None:
        """Let in-flight sends finish (up to `grace` s); put claimed-but-unsent rows back."""
        self._pump.stopping = True
        await stop_workers(self._tasks, self._pump.busy, grace)
        self._tasks = []
        for lane in self._lanes.values():
            while not lane.queue.empty():
                job = lane.queue.get_nowait()
                await self._crew.settle(Settlement(id=job.id, state="queued", attempts=job.attempts, refund=True))
        # Cancelled mid-send: Meta may have it, so the attempt counts, but the lease is released
        # so the next start retries at once instead of after the lease (~50 s); at-least-once either way.
        for job in self._crew.cut_off:
            await self._crew.settle(Settlement(id=job.id, state="queued", attempts=job.attempts))
        if self._crew.cut_off:
            count = len(self._crew.cut_off)
            log.warning("%d send(s) cut off by the shutdown are queued again (a duplicate is possible)", count)
        self._crew.cut_off.clear()
        if self._pacing is not None:
            await self._pacing.close()

    @property
    def running(self) -> bool:
        return bool(self._tasks) and all(not t.done() for t in self._tasks) and not self._pump.stopping

    @property
    def counts(self) -> Mapping[str, int]:
        """Send outcomes so far (read-only; the numbers live in the telemetry object)."""
        return MappingProxyType(self._telemetry.sender)

    # ------------------------------------------------------------------ views

    @property
    def queued(self) -> int:
        return sum(lane.queue.qsize() for lane in self._lanes.values())

    def queue_depths(self) -> dict[str, int]:
        """Claimed sends waiting for a worker, per tenant."""
        return {name: lane.queue.qsize() for name, lane in self._lanes.items()}

    def slowed(self, tenant: str) -> bool:
        """True while the tenant's number runs slower after a throughput error from Meta."""
        return self._lanes[tenant].limiter.slowed

    def split(self, nodes: int) -> None:
        """`nodes` processes send for every number (a shared database without a shared limiter):
        each paces itself to an equal share, so together they never exceed the rate."""
        for lane in self._lanes.values():
            if isinstance(lane.limiter, LocalPacer):  # a shared limiter takes its share from the node count
                lane.limiter.limiter.split(nodes)

    def wake(self) -> None:
        """New rows were queued, or are about to be (see `Pump.wake`): claim now rather than at the next poll."""
        self._pump.wake()

    # ------------------------------------------------------------------ pauses

    @property
    def pauses(self) -> Mapping[str, Pause]:
        """Paused tenants and why."""
        return self._pauses.current()

    def _pause(self, tenant: str, order: PauseOrder) -> None:
        """A token pause holds every tenant using the same token; other pauses only this one."""
        group = self._token_groups.get(tenant, "")
        sharing = [name for name in self._lanes if self._token_groups.get(name, "") == group]
        for name in sharing if order.scope == "token" else [tenant]:
            if self._pauses.hold(name, Pause(order.kind, order.reason, order.code, self._clock())):
                log.error("PAUSED all sends of tenant %s (%s); queued messages wait", name, order.reason)

    def resume(self, tenant: str) -> bool:
        """Lift a pause (operator action or a successful probe); False if it was not paused."""
        if not self._pauses.lift(tenant):
            return False
        log.warning("resumed sends of tenant %s", tenant)
        self.wake()
        return True

    async def _housekeeping(self) -> None:
        """Probe token-paused tenants; forget idle recipients' pair state (bounded memory)."""
        last_prune = self._monotonic()
        while True:
            await asyncio.sleep(self._out.probe_interval_seconds)
            for tenant, pause in list(self.pauses.items()):
                if pause.kind == "token" and await self._transport.probe(self._lanes[tenant].phone_number_id):
                    self.resume(tenant)
            if self._monotonic() - last_prune >= PRUNE_EVERY:
                for lane in self._lanes.values():
                    lane.pairs.prune()
                last_prune = self._monotonic()


def _lease(cfg: Config, lanes: Iterable[Lane]) -> float:
    """Long enough for a full lane to drain at its rate and its sends to time out twice."""
    drain = max(lane.capacity / cfg.outbound.rate_per_second for lane in lanes)
    return cfg.graph.timeout_seconds * 2 + drain + 30
