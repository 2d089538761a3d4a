"""Helpers shared by the benchmarks: loopback ports and CPU pinning."""

from __future__ import annotations

import shutil
import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: list[str], cpu: int) -> list[str]:
    """`cmd` pinned to one CPU with taskset (unchanged where taskset is missing)."""
    return ["taskset", "-c", str(cpu), *cmd] if shutil.which("taskset") else cmd
