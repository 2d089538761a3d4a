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

With `retention.archive_url` set, each batch is first read whole (`Maintenance.archive_batch`),
uploaded to S3-compatible storage (`alfred_bot.archive`), and only then scrubbed, exactly those
rows (`scrub(only=...)`). An upload that fails scrubs nothing and deletes nothing in that pass (a
row past `delete_days` that was never archived must not go either): the next pass tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from alfred_bot import media
from alfred_bot.archive import ArchiveError, S3Archive
from alfred_bot.config import RetentionConfig
from alfred_bot.store import Maintenance

log = logging.getLogger("alfred.retention")

DAY = 86400.0
#: Rows per table per archived batch: one object per table stays small (~100 kB compressed).
ARCHIVE_BATCH = 500


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
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """`environ` (default: the process's) holds the archive's credentials: a missing one is a
        `ConfigError` here, at start-up, not a failure an hour later."""
        self.archive = S3Archive.from_config(cfg, os.environ if environ is None else environ)
        self._store = store
        self._media_days = media_days
        self._cfg = cfg
        self._key = key
        self._media_dir = media_dir
        self._clock = clock
        self.totals: Counter[str] = Counter()

    async def run_once(self) -> dict[str, int]:
        """One full pass: (archive and) scrub, delete, prune media; returns what it did."""
        now = self._clock()
        hot, gone = now - self._cfg.hot_days * DAY, now - self._cfg.delete_days * DAY
        done = {"scrubbed": 0, "deleted": 0}
        if self.archive is None:
            while changed := await self._store.scrub(self._key, hot):
                done["scrubbed"] += changed
        elif not await self._archive_logged(hot, now, done):
            done["media_files"] = 0
            self.totals.update(done)
            return done  # nothing deleted either: rows past delete_days may not be archived yet
        while changed := await self._store.purge(gone):
            done["deleted"] += changed
        # file I/O off the event loop: a folder of thousands of files must not stall webhooks
        done["media_files"] = await asyncio.to_thread(media.prune, self._media_dir, self._media_days * DAY, now)
        self.totals.update(done)
        if any(done.values()):
            log.info(
                "retention: %d rows scrubbed (%d archived), %d deleted, %d media files",
                done["scrubbed"],
                done.get("archived", 0),
                done["deleted"],
                done["media_files"],
            )
        return done

    async def archive_once(self, done: dict[str, int] | None = None) -> dict[str, int]:
        """Archive, then scrub, every row past the hot period now (`python main.py archive`):
        `archived` rows in `objects` uploads, `scrubbed` rows, counted into `done` as it goes (so a
        caller knows what happened before an `ArchiveError`)."""
        done = {"archived": 0, "objects": 0, "scrubbed": 0} if done is None else done
        now = self._clock()
        await self._archive_and_scrub(now - self._cfg.hot_days * DAY, now, done)
        return done

    async def _archive_logged(self, hot: float, now: float, done: dict[str, int]) -> bool:
        done.update(archived=0, objects=0)
        try:
            await self._archive_and_scrub(hot, now, done)
        except ArchiveError as exc:
            self.totals["archive_failures"] += 1
            log.error("retention: archive failed, nothing more scrubbed or deleted until the next pass: %s", exc)
            return False
        return True

    async def _archive_and_scrub(self, hot: float, now: float, done: dict[str, int]) -> None:
        if self.archive is None:
            raise ArchiveError("retention.archive_url is not set")
        while batch := await self._store.archive_batch(hot, ARCHIVE_BATCH):
            done["objects"] += len(await self.archive.store(batch, now))
            changed = await self._store.scrub(self._key, hot, only=batch.keys)
            done["archived"] += len(batch)
            done["scrubbed"] += changed
            if not changed:  # every row changed meanwhile (a dead letter queued again): never spin
                break
