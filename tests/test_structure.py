"""Structural rules of issue 14 item 9, checked on the source so they hold as the code grows:
no class in `alfred_bot/` over 200 lines, and tests use the app's public surface, never its
private attributes (a test that reaches into `_lanes` breaks on every refactor and proves nothing
a user can see)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "alfred_bot"
TESTS = ROOT / "tests"
MAX_CLASS_LINES = 200

#: Names a test may read although they start with "_", with why. Keep it short and explained.
ALLOWED_PRIVATE: dict[str, str] = {
    # tests/conftest.py, leaving a run whose threads would hang the interpreter's exit: the
    # standard library's documented ways to read another thread's stack and to exit at once
    "_current_frames": "sys: the stack of a thread left running after the tests",
    "_exit": "os: leave without joining that thread",
}


def class_sizes(source: str) -> dict[str, int]:
    """Every class (nested ones too) and its length in lines, decorators included."""
    sizes: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            sizes[node.name] = (node.end_lineno or node.lineno) - first + 1
    return sizes


def private_reads(source: str) -> list[tuple[int, str]]:
    """`obj._name` where obj is not `self`, `cls` or `super()`: a test reaching into an object.

    Dunders (`__class__`, `__name__`) are Python's public protocol and allowed."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_") or node.attr.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
            continue
        if node.attr not in ALLOWED_PRIVATE:
            found.append((node.lineno, f"{ast.unparse(owner)}.{node.attr}"))
    return found


def test_no_class_in_the_package_exceeds_200_lines() -> None:
    too_long = {
        f"{path.relative_to(ROOT)}::{name}": size
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, size in class_sizes(path.read_text(encoding="utf-8")).items()
        if size > MAX_CLASS_LINES
    }
    assert not too_long, f"split these classes (over {MAX_CLASS_LINES} lines): {too_long}"


def test_tests_do_not_read_private_attributes() -> None:
    reads = {
        f"{path.relative_to(ROOT)}:{line}": expr
        for path in sorted(TESTS.rglob("*.py"))
        for line, expr in private_reads(path.read_text(encoding="utf-8"))
    }
    assert not reads, f"use a public surface (or add to ALLOWED_PRIVATE with why): {reads}"


# ------------------------------------------------------------------ the checkers themselves


def test_class_sizes_counts_decorators_and_nested_classes() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    source = f"@decorator\nclass Big:\n{body}\n\nclass Small:\n    class Inner:\n        pass\n"
    sizes = class_sizes(source)
    assert sizes["Big"] == MAX_CLASS_LINES + 2
    assert sizes["Small"] == 3 and sizes["Inner"] == 2


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("client.app[keys.SENDER]._lanes", ["client.app[keys.SENDER]._lanes"]),
        ("store._fetch('x', ())", ["store._fetch"]),
        ("transport._media_url(u)", ["transport._media_url"]),
        ("self._ids", []),
        ("super()._media_info(r, m)", []),
        ("cls._cache", []),
        ("type(x).__name__", []),
        ("dispatcher.counts['handled']", []),
    ],
)
def test_private_reads_spots_reaching_in(source: str, expected: list[str]) -> None:
    assert [expr for _, expr in private_reads(source)] == expected
