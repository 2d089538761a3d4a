"""Exact dependencies (issue 14 item 8): requirements.txt pins every package Alfred imports, and only those.

Why a test: a package that is imported but not pinned arrives at whatever version its parent happens
to pull (prometheus_client came in through prometheus-async), and a package that is pinned but never
imported is install time, image size and supply-chain surface for nothing (orjson and
prometheus-async were). The imports are read with `ast` from the runtime sources (alfred_bot/,
handlers/, main.py), lazy and TYPE_CHECKING imports included, and mapped to the distributions that
provide them with `importlib.metadata.packages_distributions()`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNTIME = REPO / "requirements.txt"
DEV = REPO / "requirements-dev.txt"
SOURCES = ("alfred_bot", "handlers", "main.py")
OWN = frozenset({"alfred_bot", "handlers", "main"})
PIN = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!-]+)")


def normalize(name: str) -> str:
    """PEP 503 name: `Jinja2`, `prometheus_client` and `prometheus-client` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path: Path) -> Iterator[tuple[str, str]]:
    """(requirement, comment) of each line that is not blank, a comment or an `-r` include."""
    for raw in path.read_text(encoding="utf-8").splitlines():
        requirement, _, comment = raw.partition(" #")
        requirement = requirement.strip()
        if requirement and not requirement.startswith(("#", "-r ")):
            yield requirement, comment.strip()


def pins(path: Path) -> dict[str, str]:
    """Normalised name -> exact version; any requirement that is not `name==version` fails the test."""
    found: dict[str, str] = {}
    for requirement, _ in requirement_lines(path):
        match = PIN.fullmatch(requirement)
        assert match, f"{path.name}: {requirement!r} is not an exact pin (name==version)"
        found[normalize(match["name"])] = match["version"]
    return found


def _top_level_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.partition(".")[0] for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module.partition(".")[0]]
    return []  # relative imports are our own package


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> the source files that import it, for every module not ours and not stdlib."""
    files = [p for s in SOURCES for p in ((REPO / s).rglob("*.py") if (REPO / s).is_dir() else [REPO / s])]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            for name in _top_level_names(node):
                if name not in OWN and name not in sys.stdlib_module_names:
                    found.setdefault(name, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_pinned_at_the_installed_version() -> None:
    pinned = pins(RUNTIME)
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, where in sorted(third_party_imports().items()):
        dists = providers.get(module, [])
        if not dists:
            problems.append(f"`{module}` (imported in {sorted(where)}) is not installed: pin it in requirements.txt")
            continue
        names = {normalize(d) for d in dists}
        if not names & pinned.keys():
            problems.append(f"`{module}` (imported in {sorted(where)}) comes from {dists}: pin it in requirements.txt")
        for name in names & pinned.keys():
            installed = importlib.metadata.version(name)
            if installed != pinned[name]:
                problems.append(f"{name}: requirements.txt pins {pinned[name]} but {installed} is installed")
    assert not problems, "\n".join(problems)


def test_every_pinned_runtime_package_is_imported() -> None:
    providers = importlib.metadata.packages_distributions()
    used = {normalize(d) for module in third_party_imports() for d in providers.get(module, [])}
    unused = sorted(set(pins(RUNTIME)) - used)
    assert not unused, f"pinned in requirements.txt but never imported by alfred_bot/, handlers/, main.py: {unused}"


def test_requirement_files_pin_exactly_and_say_what_each_runtime_package_is_for() -> None:
    assert pins(DEV), "requirements-dev.txt pins the test tools exactly"
    assert "-r requirements.txt" in DEV.read_text(encoding="utf-8").splitlines(), "CI installs both files"
    silent = [requirement for requirement, comment in requirement_lines(RUNTIME) if not comment]
    assert not silent, f"requirements.txt: say in a comment what each package is for: {silent}"
