"""The README's main line, as a user runs it: `python3 -m pip install . && insitu-daq demo` in
the repository root, in a fresh virtual environment.

The rest of the suite runs on an editable install, where the source tree and the installed
package are the same files. Here the checkout is installed for real (not editable), and the demo
runs with the repository root as its current folder: the root holds the source `insitu_daq/`,
which has no drivers/ or sim/ (they install as insitu_daq.drivers and insitu_daq.sim), so any
process the demo starts that imported it instead of the installed package would die. The
checkout is copied first, so the build leaves nothing in it. The dependencies come through pip
as for a user (its cache makes them quick); the control protocol at a time scale of 10 keeps
the run short.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import venv
from pathlib import Path

import h5py
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NOT_THE_CHECKOUT = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
    ".ruff_cache", "runs",
)  # fmt: skip


@pytest.mark.timeout(300)  # room for a pip that must fetch the dependencies
def test_readme_main_line_runs_the_demo_from_the_repository_root(tmp_path: Path) -> None:
    # What makes this test meaningful: the current folder holds a source package that cannot run.
    assert (REPO_ROOT / "insitu_daq" / "__init__.py").is_file()
    assert not (REPO_ROOT / "insitu_daq" / "drivers").exists()

    checkout = tmp_path / "checkout"
    shutil.copytree(REPO_ROOT, checkout, ignore=NOT_THE_CHECKOUT)
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python, entry_point = environment / "bin" / "python", environment / "bin" / "insitu-daq"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{environment / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    # --no-compile: byte-compiling every module of the ~640 MB of dependencies took 22 of the
    # install's 57 s here; Python compiles what the demo imports as it imports it.
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", str(checkout)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run(
        [str(python), "-c", "import insitu_daq; print(insitu_daq.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(environment), where  # installed, not linked

    data_dir = tmp_path / "runs"
    demo = subprocess.run(
        [str(entry_point), "demo", "--protocol", "lno_control_0v.yaml", "--time-scale", "10",
         "--no-figure", "--data-dir", str(data_dir)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=180,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert ": finished" in demo.stdout
    (run_file,) = data_dir.glob("*_lno_control_0v.h5")
    with h5py.File(run_file, "r") as f:
        assert f["/entry/instrument/detector/data"].shape[0] > 0
        assert f["/entry/end_time"][()].decode()
