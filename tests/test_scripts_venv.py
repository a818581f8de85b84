"""scripts/_venv.py: a script in scripts/ started by a python outside any venv re-runs itself
with the checkout's .venv/bin/python (so ``scripts/conformance`` works after scripts/setup
without activating anything), and leaves a venv's python, or DMSIM_NO_VENV=1, alone."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = """#!/usr/bin/env python3
import sys

import _venv  # noqa: F401

print(sys.prefix, *sys.argv[1:])
"""


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A copy of scripts/_venv.py, a probe script beside it, and a .venv (no pip: only its python counts)."""
    root = tmp_path_factory.mktemp("venvtree")
    (root / "scripts").mkdir()
    shutil.copy(os.path.join(REPO, "scripts", "_venv.py"), root / "scripts" / "_venv.py")
    (root / "scripts" / "probe").write_text(PROBE)
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    subprocess.run([base, "-m", "venv", "--without-pip", str(root / ".venv")], check=True, timeout=120)
    return root, base


def probe(python: str, root, **env: str) -> list[str]:
    r = subprocess.run([python, str(root / "scripts" / "probe"), "a b", "--x"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, **env}, cwd=str(root))
    assert r.returncode == 0, r.stderr
    return r.stdout.split(" ", 1)


def test_base_python_reexecs_into_the_checkouts_venv(tree):
    root, base = tree
    prefix, args = probe(base, root)
    assert prefix == str(root / ".venv")
    assert args == "a b --x\n"          # the arguments survive the exec unchanged


def test_a_venv_python_and_the_opt_out_are_left_alone(tree):
    root, base = tree
    assert probe(str(root / ".venv" / "bin" / "python"), root)[0] == str(root / ".venv")
    base_prefix = subprocess.run([base, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                 check=True, timeout=60).stdout.strip()
    assert probe(base, root, DMSIM_NO_VENV="1")[0] == base_prefix


def test_no_venv_runs_the_script_as_started(tree, tmp_path):
    root, base = tree
    bare = tmp_path / "bare"
    shutil.copytree(root / "scripts", bare / "scripts")
    assert probe(base, bare)[0] != str(bare / ".venv")
