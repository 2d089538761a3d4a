"""The Redis Streams event bus (issue 16): Alfred as the WhatsApp adapter of the seed's bus.

- `relay`: the store's feed (rows committed with every accepted message, status, event and send
  outcome) published to `alfred-ingest` and `alfred-events`: a transactional outbox.
- `consumer`: `alfred-outbox` read in a consumer group on every sending node; each request queued
  durably (judged by the API's own checks), then acknowledged; invalid ones to `alfred-outbox-dead`.
- `node`: the wiring (`install`, called by the app factory) and `health`: what `/healthz` and
  `/status.json` say about Redis, the relay, the consumer and the shared pacing.

Nothing here runs, and the store writes no feed row, unless a Redis URL is configured
(`ALFRED_REDIS_URL` or `[redis] url`). This package's `__init__` imports nothing: the API
imports `health`, and `node` imports the API.
"""
