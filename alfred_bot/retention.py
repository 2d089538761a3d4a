"""The retention job: WHEN to scrub (after `hot_days`) and purge (after `delete_days`), engine-neutral.

This module decides timing and batching and calls the store's `Maintenance` role; the statements
that do the scrubbing live with each engine (SQLite: `store/sqlite/retention.py`).

Past the hot period, rows keep what operations need (ids, types, states, times, error codes) and
lose what identifies or quotes a person: message texts, captions, names and raw bodies are
removed, phone numbers and user ids become keyed pseudonyms (`privacy.pseudonym`), and
downloaded media files are deleted. Past `delete_days` the rows go. Dedupe keys (wamids, status
keys) survive scrubbing, and `delete_days` is at least 8, so Meta's 7-day redelivery window can
never re-deliver a message we forgot. Messages still pending and sends still queued are never
touched. Work is done in batches so no transaction holds the writer for long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from alfred_bot import media
from alfred_bot.config import RetentionConfig
from alfred_bot.store import Maintenance

log = logging.getLogger("alfred.retention")

DAY = 86400.0

class Retention:
    """The periodic job; `run_once` is what the tests call with an injected clock."""

    def __init__(
        self,
        store: Maintenance,
        cfg: RetentionConfig,
        key: bytes,
        media_dir: Path,
        *,
        media_days: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._media_days = media_days
        self._cfg = cfg
        self._key = key
        self._media_dir = media_dir
        self._clock = clock
        self.totals: Counter[str] = Counter()

    async def run_once(self) -> dict[str, int]:
        """One full pass: scrub, delete, prune media; returns what it did."""
        now = self._clock()
        hot, gone = now - self._cfg.hot_days * DAY, now - self._cfg.delete_days * DAY
        done = {"scrubbed": 0, "deleted": 0}
        while changed := await self._store.scrub(self._key, hot):
            done["scrubbed"] += changed
        while changed := await self._store.purge(gone):
            done["deleted"] += changed
        # file I/O off the event loop: a folder of thousands of files must not stall webhooks
        done["media_files"] = await asyncio.to_thread(media.prune, self._media_dir, self._media_days * DAY, now)
        self.totals.update(done)
        if any(done.values()):
            log.info("retention: %(scrubbed)d rows scrubbed, %(deleted)d deleted, %(media_files)d media files", done)
        return done
