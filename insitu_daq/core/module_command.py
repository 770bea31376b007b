"""The command line that runs a module of the installed insitu_daq in a new Python process.

Why not `python -m insitu_daq`. `-m` puts the current folder first on sys.path, so a process
started from the repository root imports the source tree's `insitu_daq/` instead of the
installed package; the source tree has no `drivers/` or `sim/` (they install as
insitu_daq.drivers and insitu_daq.sim), and the child dies with "No module named
'insitu_daq.drivers'". Every process the project starts (the demo's simulated station and
daemon, the daemon's bias guardian, the benchmarks' children) is built here, so each imports
the package installed for `sys.executable` whatever the current folder.

How. Python 3.11+ has `-P` (sys.flags.safe_path: nothing unsafe is prepended to sys.path).
Python 3.10 has no such flag, so there `-c` drops the current folder (`''`, which `-c` puts
first) and runs the module with runpy exactly as `-m` would: as `__main__`, with sys.argv[0]
the module's file. multiprocessing "spawn" children of such a process need nothing more:
they take their parent's sys.path.
"""

from __future__ import annotations

import sys

SAFE_PATH_FLAG = sys.version_info >= (3, 11)  # `python -P`

# argv of the -c program: ["-c", MODULE, *args]; the module sees ["<its file>", *args].
RUN_MODULE_WITHOUT_CURRENT_FOLDER = (
    "import runpy, sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)\n"
)


def module_command(module: str, *args: str, safe_path_flag: bool = SAFE_PATH_FLAG) -> list[str]:
    """argv that runs `python -m module args...` without the current folder on sys.path.

    `safe_path_flag=False` gives the Python 3.10 form on any version (tests use it).
    """
    if safe_path_flag:
        return [sys.executable, "-P", "-m", module, *args]
    return [sys.executable, "-c", RUN_MODULE_WITHOUT_CURRENT_FOLDER, module, *args]
