"""The cluster crash run's short version: chaos/cluster.py with 2 nodes on a real PostgreSQL.

The full run is `python chaos/cluster.py --nodes 3 --seconds 90 --kills 9 --rate 200`. This one
fires 100 webhooks/s for 20 s at 2 nodes sharing one database, kills nodes 3 times (each down
for seconds, its work taken over by the other), stops one cleanly under load and restarts
PostgreSQL once (`pg_ctl restart -m fast`); then drains and checks every promise. 40-70 s.
Without PostgreSQL's binaries the script exits 2 and this test FAILS (CI installs `postgresql`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_short_cluster_run_keeps_every_promise(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "ALFRED_"))}
    cmd = [sys.executable, "chaos/cluster.py", "--nodes", "2", "--seconds", "20", "--kills", "3", "--rate", "100"]
    cmd += ["--seed", "3", "--json", str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["violations"] == []
    assert r["kills"] >= 3 and set(r["kills_by_kind"]) == {"mid-send", "mid-commit", "random"}
    assert r["sigterm_stops"] >= 1 and r["pg_restarts"] == 1
    assert r["final_exits"] == [0, 0]
    assert r["accepted"] > 500
    assert r["answered"] == r["accepted"]
    assert (r["lost"], r["still_queued"], r["not_stored"], r["handled_twice"]) == (0, 0, 0, 0)
    assert r["receipts_missing"] == 0
    assert r["api_accepted"] > 0 and r["api_lost"] == 0
    assert r["forged_sent"] > 0 and r["forged_effects"] == 0
    assert r["http_500"] == 0 and r["outbox_states"].get("failed", 0) == 0
    assert r["duplicates"] <= r["allowed_duplicates"]
    assert r["integrity"] == "ok" and r["secrets_found"] == []
    # the load balancer really moved work between nodes, and the inbox deduped across them
    assert r["retries_to_another_node"] > 0 and r["redelivered_elsewhere"] > 0
    # the database restart happened under load: webhooks were refused meanwhile, and retried
    refused = {k: v for k, v in r["webhook_answers"].items() if k.startswith("pg-restart /webhook") and "200" not in k}
    assert sum(refused.values()) > 0, r["webhook_answers"]
    assert "| verdict" in done.stdout and "PASS" in done.stdout
