"""Layering: SQL and the SQLite drivers live in `alfred_bot/store/` only.

Everything else talks to the store's role interfaces, so a second engine (issue 15) replaces one
package and nothing else. Read with `ast`, so comments and docstrings that merely mention SQL
are allowed; string literals that look like SQL statements, and driver imports, are not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DRIVERS = {"sqlite3", "aiosqlite", "asyncpg", "psycopg", "psycopg2"}
#: The shapes of SQL statements (upper case, as this code base writes them), not English words.
SQL = re.compile(
    r"\bSELECT\b[\s\S]+\bFROM\b|\bINSERT\s+(OR\s+\w+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bCREATE\s+(TABLE|INDEX|VIEW)\b|\bDROP\s+TABLE\b|\bPRAGMA\s+\w+|\bBEGIN\s+IMMEDIATE\b"
)


def _outside_store() -> list[Path]:
    store = ROOT / "alfred_bot" / "store"
    files = [*sorted((ROOT / "alfred_bot").rglob("*.py")), *sorted((ROOT / "handlers").rglob("*.py")), ROOT / "main.py"]
    return [f for f in files if store not in f.parents]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def problems(source: str) -> list[str]:
    """Driver imports and SQL-looking string literals in one module's source."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in DRIVERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in DRIVERS:
            found.append(f"imports from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            found += [f"line {node.lineno}: SQL {node.value[:60]!r}"] if SQL.search(node.value) else []
    return found


def test_the_checker_finds_what_it_looks_for() -> None:
    bad = 'import sqlite3\nfrom aiosqlite import connect\nQ = "SELECT id FROM outbox"\n'
    bad += 'U = f"UPDATE outbox SET a = {1}"\n'
    assert len(problems(bad)) == 4
    fine = '"""SELECT the row FROM the table, says a docstring."""\nX = "select a reply from the menu"\n'
    assert problems(fine) == []


@pytest.mark.parametrize("path", _outside_store(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_sql_and_no_driver_outside_the_store(path: Path) -> None:
    assert problems(path.read_text(encoding="utf-8")) == [], f"{path.relative_to(ROOT)} must use the store's interfaces"
