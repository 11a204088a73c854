"""flava/cli.py: a command whose extra is not installed says which one, without a traceback.

The API image has no torch and the worker image no FastAPI (Dockerfile). A child process here
blocks the import of one package (``sys.modules[name] = None``: Python's own way of making an
import fail with ModuleNotFoundError, as when the package is not installed) and runs the real
command.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from flava.cli import EXTRAS, _parser

ROOT = Path(__file__).resolve().parents[2]


def run_without(package: str, *argv: str) -> subprocess.CompletedProcess:
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"
        "from flava.cli import main\n"
        f"sys.exit(main({list(argv)!r}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "FLAVA_ENVIRONMENT": "dev", "FLAVA_LOG_FORMAT": "text"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_worker_without_torch_names_the_worker_extra():
    for argv in (["worker"], ["worker", "--nproc", "2"], ["embedder"]):
        run = run_without("torch", *argv)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        assert f"flava {argv[0]}: the module 'torch' is not installed" in run.stderr
        assert "pip install 'flava-stream[worker]'" in run.stderr


def test_serve_without_uvicorn_names_the_api_extra():
    run = run_without("uvicorn", "serve", "--port", "1")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "pip install 'flava-stream[api]'" in run.stderr


def test_a_missing_module_of_our_own_is_a_bug_and_keeps_its_traceback():
    run = run_without("worker.main", "worker")
    assert run.returncode == 1
    assert "Traceback" in run.stderr and "ModuleNotFoundError" in run.stderr


def test_every_command_named_in_extras_exists_and_every_extra_is_declared():
    commands = _parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(EXTRAS) <= set(commands)
    assert set(EXTRAS.values()) <= set(extras["optional-dependencies"])
