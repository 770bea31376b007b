"""The rooms depend on each other only downwards, as docs/ARCHITECTURE.md draws them.

A module that reaches up (a driver importing the service, the ingest importing the daemon's
side) ties a room to what is built on it, and the folders stop telling a newcomer where a change
goes. The table below is the one in docs/ARCHITECTURE.md; imports are read from the source with
ast, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# room -> the rooms it may import from (besides itself and the top package's __version__).
ALLOWED: dict[str, set[str]] = {
    "analysis": set(),
    "drivers": set(),
    "sim": set(),
    "core": {"analysis"},
    "runfile": {"core", "analysis", "drivers"},
    "ingest": {"core", "runfile", "drivers"},
    "live": {"core", "analysis", "drivers"},
    "control": {"core", "analysis", "drivers"},
    "report": {"core", "analysis", "runfile"},
    "verify": {"core", "analysis", "report"},
    "service": {"core", "analysis", "drivers", "control", "ingest", "live", "runfile"},
    "web": {"core", "analysis", "runfile", "report", "service"},
    "app": {"core", "analysis", "control", "report", "runfile", "service", "sim", "verify", "web"},
}


def _room_of_module(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "insitu_daq" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ALLOWED else None


def _imports(path: Path, package: list[str]) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names += [f"{module}.{alias.name}" for alias in node.names]
    return names


def _sources() -> list[tuple[str, Path, list[str]]]:
    found = []
    for folder, package_root in (("insitu_daq", []), ("drivers", ["drivers"]), ("sim", ["sim"])):
        for path in sorted((REPO / folder).rglob("*.py")):
            relative = path.relative_to(REPO / folder).with_suffix("").parts
            package = ["insitu_daq", *package_root, *relative[:-1]]
            room = package_root[0] if package_root else (relative[0] if len(relative) > 1 else "")
            if room in ALLOWED:
                found.append((room, path, package))
    return found


def test_every_room_imports_only_the_rooms_below_it() -> None:
    upward = sorted(
        f"{path.relative_to(REPO)} ({room}) imports {name}"
        for room, path, package in _sources()
        for name in _imports(path, package)
        if (target := _room_of_module(name)) and target != room and target not in ALLOWED[room]
    )
    assert not upward, "\n".join(upward)


def test_the_table_is_the_architecture_notes_table() -> None:
    notes = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for room, below in ALLOWED.items():
        row = next((line for line in notes.splitlines() if line.startswith(f"| `{room}/`")), None)
        assert row is not None, f"docs/ARCHITECTURE.md has no row for {room}/"
        cell = row.rstrip(" |").rsplit("|", 1)[1]
        named = {word.strip(" `/") for word in cell.split(",")} - {"nothing", ""}
        assert named == below, f"{room}/: the notes say {sorted(named)}, the test {sorted(below)}"
