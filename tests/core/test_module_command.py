"""Processes the project starts import the installed insitu_daq, whatever the current folder.

A folder holding a decoy `insitu_daq/` package stands in for the repository root (whose source
`insitu_daq/` has no drivers/ or sim/). Both forms of the command are run for real: `-P` (the
form on Python 3.11+) and the `-c` form used on Python 3.10, which runs on any version.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import insitu_daq
from insitu_daq.core.module_command import module_command

FORMS = [pytest.param(True, id="python -P -m"), pytest.param(False, id="python -c runpy")]


@pytest.fixture
def folder_with_a_decoy_package(tmp_path: Path) -> Path:
    decoy = tmp_path / "insitu_daq"
    decoy.mkdir()
    (decoy / "__init__.py").write_text("raise SystemExit('the decoy insitu_daq was imported')\n")
    (decoy / "__main__.py").write_text("raise SystemExit('the decoy insitu_daq was run')\n")
    return tmp_path


@pytest.mark.parametrize("safe_path_flag", FORMS)
def test_the_installed_package_runs_from_a_folder_holding_another_insitu_daq(
    folder_with_a_decoy_package: Path, safe_path_flag: bool
) -> None:
    result = subprocess.run(
        module_command("insitu_daq", "--version", safe_path_flag=safe_path_flag),
        cwd=folder_with_a_decoy_package, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"insitu-daq {insitu_daq.__version__}"


@pytest.mark.parametrize("safe_path_flag", FORMS)
def test_a_module_of_the_installed_package_sees_its_arguments_and_gives_its_exit_code(
    folder_with_a_decoy_package: Path, safe_path_flag: bool
) -> None:
    """As with `-m`: the arguments follow the module, its exit code is the process's."""
    result = subprocess.run(
        module_command("insitu_daq", "no-such-command", safe_path_flag=safe_path_flag),
        cwd=folder_with_a_decoy_package, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2  # argparse's usage error
    assert "invalid choice: 'no-such-command'" in result.stderr
    assert result.stderr.startswith("usage: insitu-daq")
