"""Every package in the source tree is installed.

pyproject.toml lists its packages explicitly (drivers/ and sim/ are mapped into insitu_daq with
package-dir), so a new sub-package that is not listed works in an editable install and in this
tree but is missing from a wheel: `insitu-daq` would then fail on a fresh machine with an
ImportError. tests/project/test_install.py catches that too, but only after a minute of installing.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def _installed_packages() -> tuple[set[str], dict[str, str]]:
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(setuptools["packages"]), setuptools["package-dir"]


def _packages_in_tree(package_dir: dict[str, str]) -> set[str]:
    found = set()
    for name, folder in package_dir.items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            found.add(".".join((name, *relative)))
    return found


def test_every_package_in_the_tree_is_listed_for_installation() -> None:
    listed, package_dir = _installed_packages()
    missing = _packages_in_tree(package_dir) - listed
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_listed_package_exists() -> None:
    listed, package_dir = _installed_packages()
    stale = listed - _packages_in_tree(package_dir)
    assert not stale, f"listed in pyproject.toml but not in the tree: {sorted(stale)}"
