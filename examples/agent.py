"""An agent on Alfred's event bus: read WhatsApp messages from `alfred-ingest`, answer through `alfred-outbox`.

    pip install redis
    REDIS_URL=redis://localhost:6379/0 python examples/agent.py

Its own consumer group (`shouty-agent`): every agent group gets every entry, each entry goes to
one consumer of the group. It acknowledges an entry only after its reply is on `alfred-outbox`,
and gives each reply an idempotency key derived from the message id, so an entry seen twice (the
relay is at-least-once, and a restart re-reads what was not acknowledged) is answered once.
"""

import contextlib
import json
import os

import redis

r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
GROUP, ME = "shouty-agent", f"agent-{os.getpid()}"
with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: the group exists, carry on where it stopped
    r.xgroup_create("alfred-ingest", GROUP, id="0", mkstream=True)

while True:
    # first what this consumer read before a crash and never acknowledged ("0"), then new entries (">")
    for start in ("0", ">"):
        for _stream, entries in r.xreadgroup(GROUP, ME, {"alfred-ingest": start}, count=10, block=5000) or []:
            for entry_id, fields in entries:
                event = json.loads(fields[b"event"])
                if event["kind"] == "message" and event["type"] == "text":
                    reply = {
                        "tenant": event["tenant_id"],
                        "to": event["from"] or event["user_id"],
                        "type": "text",
                        "text": {"body": event["text"].upper()},
                        "idempotency_key": f"shouty:{event['dedupe_id']}",  # one reply per message
                    }
                    r.xadd("alfred-outbox", {"message": json.dumps(reply)})
                r.xack("alfred-ingest", GROUP, entry_id)
