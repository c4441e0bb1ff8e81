"""Dependencies point one way, and protocol modules do no I/O and read no clock."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ["noise", "envelope", "sealing", "wire", "reconcile", "routing", "session", "identity",
            "errors"]
FORBIDDEN_IN_PROTOCOL = {"asyncio", "socket", "sqlite3", "time", "selectors", "threading",
                         "mesh.node", "mesh.store", "mesh.transports", "mesh.cli", "textual"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_protocol_modules_do_no_io_and_read_no_clock() -> None:
    for name in PROTOCOL:
        found = imports_of(ROOT / "mesh" / f"{name}.py")
        bad = {m for m in found if any(m == f or m.startswith(f + ".") for f in FORBIDDEN_IN_PROTOCOL)}
        # identity writes its own key file with os/pathlib only, never sockets or sqlite.
        assert not bad, f"mesh/{name}.py imports {sorted(bad)}"


def test_msgpack_is_used_only_by_the_codec() -> None:
    users = [p.relative_to(ROOT).as_posix() for p in (ROOT / "mesh").rglob("*.py")
             if "msgpack" in imports_of(p)]
    assert users == ["mesh/wire.py"]


def test_importing_mesh_never_imports_textual() -> None:
    code = ("import sys, mesh.cli, mesh.node, mesh.store, mesh.session; "
            "print(any(m == 'textual' or m.startswith('textual.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
