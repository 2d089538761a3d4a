"""The Dockerfile keeps its promises (checked statically: no Docker daemon in CI)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def test_slim_non_root_volume_healthcheck_and_plain_cmd() -> None:
    assert re.search(r"^FROM python:3\.11-slim", DOCKERFILE, re.M)
    assert re.search(r"^USER alfred$", DOCKERFILE, re.M)
    assert 'VOLUME ["/app/data"]' in DOCKERFILE
    assert re.search(r"^HEALTHCHECK .*?/healthz", DOCKERFILE, re.M)
    assert DOCKERFILE.rstrip().endswith('CMD ["python", "main.py"]')
    for part in ("alfred_bot/", "handlers/", "static/", "main.py", "config.toml", "requirements.txt"):
        assert part in DOCKERFILE


def test_the_image_config_listens_on_all_interfaces(tmp_path: Path) -> None:
    """Run the Dockerfile's own sed line on a copy of config.toml."""
    [line] = [ln for ln in DOCKERFILE.splitlines() if ln.startswith("RUN sed")]
    script = line.removeprefix("RUN ")
    copy = tmp_path / "config.toml"
    copy.write_text((REPO / "config.toml").read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run(["sh", "-c", script], cwd=tmp_path, check=True)
    assert re.search(r'^host = "0\.0\.0\.0"', copy.read_text(encoding="utf-8"), re.M)
