"""The bus chaos run's short version: chaos/bus.py with 2 nodes, PostgreSQL and Redis (~30 s).

Under load, Redis is SIGKILLed and restarted and a node is SIGKILLed and restarted; then every
accepted message must be on `alfred-ingest`, every request Redis took sent (duplicates only
within what the killed node had in flight), nothing pending, the feed empty, clean exits.
Without PostgreSQL's or Redis's binaries the script exits 2 and this test FAILS (CI installs them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_short_bus_run_keeps_every_promise(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}
    cmd = [sys.executable, "chaos/bus.py", "--seconds", "15", "--rate", "30", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["violations"] == []
    assert r["kills"] == {"redis": 1, "node": 1}
    assert r["accepted"] > 150 and r["requests"] > 150
    assert (r["unpublished"], r["unsent"], r["pending"], r["feed_left"], r["dead"]) == ([], [], 0, 0, 0)
    assert r["xadd_retries"] > 0  # the agents' requests really met the Redis outage
    assert r["duplicates"] <= r["allowed_duplicates"] and r["final_exits"] == [0, 0]
