"""Re-run the importing script with the project's .venv python (made by scripts/setup).

The scripts in scripts/ start with ``#!/usr/bin/env python3``, which finds a python without
dmsim's dependencies (or with another checkout's dmsim).  Each imports this module before
anything outside the standard library, so ``scripts/conformance`` works straight after
``scripts/setup`` without activating the venv.  A python already in a venv (the project's,
or one a user made and installed dmsim into) is left alone, as is DMSIM_NO_VENV=1.
"""

import os
import sys

VENV_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv")


def reexec_in_venv() -> None:
    """exec the venv's python on this script and its arguments, when that is needed and possible."""
    python = os.path.join(VENV_DIR, "bin", "python")
    if sys.prefix != sys.base_prefix or os.environ.get("DMSIM_NO_VENV") or not os.access(python, os.X_OK):
        return
    script = sys.argv[0]
    if not script or script == "-c" or not os.path.exists(script):
        return
    os.execv(python, [python, script, *sys.argv[1:]])


reexec_in_venv()
