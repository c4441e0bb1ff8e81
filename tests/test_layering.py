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
    """Every mesh module, the CLI included: only `pigeon chat` loads Textual, lazily."""
    code = ("import sys, importlib, pkgutil, mesh, mesh.cli, mesh.node, mesh.store, mesh.session; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(mesh.__path__, 'mesh.')]; "
            "print(sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


#: What the TUI may import from the core, and why. Everything else (the store, the node
#: runtime, the control socket, profiles, locks) is reached only through a NodeClient,
#: and `pigeon chat` (mesh.cli + mesh.host) decides where the node runs and hands the app
#: a backend, so first run needs no profile helpers in tui/ at all.
TUI_ALLOWED: dict[str, set[str] | None] = {
    "mesh": {"api"},                      # `from mesh import api`
    "mesh.api": None,                     # plain data types and events
    "mesh.client": {"NodeClient"},        # the one API to the node, in-process or attached
    "mesh.errors": {"UserError"},         # messages meant for a person
    "mesh.chat": {"KeyChangedError"},     # a key change gets the loud warning screen
    "mesh.identity": {"decode_contact"},  # show a pasted code's fingerprint before saving it
}


def test_tui_reaches_the_node_only_through_its_public_api() -> None:
    checked = 0
    for path in sorted((ROOT / "tui").rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith("mesh"), f"{where}: import {alias.name}"
                    assert alias.name.split(".")[0] not in {"sqlite3", "socket"}, where
            elif isinstance(node, ast.ImportFrom) and node.module:
                module = node.module
                assert module.split(".")[0] not in {"sqlite3", "socket"}, f"{where}: {module}"
                if module != "mesh" and not module.startswith("mesh."):
                    continue
                checked += 1
                assert module in TUI_ALLOWED, f"{where} imports {module}"
                allowed = TUI_ALLOWED[module]
                names = {alias.name for alias in node.names}
                assert allowed is None or names <= allowed, f"{where}: {module} {names - allowed}"
    assert checked > 5
