"""``flava config show``: every process's effective settings, secrets masked.

What each process would run with if started now from this environment: the config file at
``FLAVA_CONFIG`` (contract/config.py) under the ``FLAVA_*`` variables. A secret setting
(``api_token``, any ``*_password``...) prints as ``***`` and a URL's password as
``scheme://user:***@host``; the keys of the file that no process reads are listed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic_settings import BaseSettings

from contract.config import ConfigFileError, config_path, read_config, unknown_keys
from contract.logs import LogSettings
from contract.redact import MASK, is_secret_name, redact
from service.settings import ApiSettings
from worker.settings import EmbedderSettings, WorkerSettings

TABLES: dict[str, type[BaseSettings]] = {
    "api": ApiSettings,
    "worker": WorkerSettings,
    "embedder": EmbedderSettings,
    "logging": LogSettings,
}


def masked(name: str, value: Any) -> Any:
    """``value`` as it may be shown: a secret setting's as ***, URL passwords masked."""
    if value is not None and value != "" and is_secret_name(name):
        return MASK
    if isinstance(value, str):
        return redact(value)
    return list(value) if isinstance(value, tuple) else value


def effective(table: str) -> dict[str, Any]:
    """One process's settings, masked; {"error": why} when they do not validate."""
    try:
        settings = TABLES[table]()
    except ValueError as exc:  # pydantic's ValidationError: the process would refuse to start
        return {"error": redact(str(exc))}
    return {name: masked(name, value) for name, value in settings.model_dump().items()}


def report() -> dict[str, Any]:
    """{"config_file", "unknown_keys", "api": {...}, "worker": {...}, ...}."""
    path = config_path()
    out: dict[str, Any] = {"config_file": str(path) if path else None}
    out["unknown_keys"] = unknown_keys(read_config(path), TABLES)
    out.update({table: effective(table) for table in TABLES})
    return out


def as_toml(shown: dict[str, Any]) -> str:
    """The report as TOML-like text (an unset value as a comment, TOML has no null)."""
    lines = [f"# config file: {shown['config_file'] or 'none (FLAVA_CONFIG unset)'}"]
    if shown["unknown_keys"]:
        lines.append(f"# keys no process reads: {', '.join(shown['unknown_keys'])}")
    for table in TABLES:
        lines += ["", f"[{table}]"]
        for name, value in shown[table].items():
            line = f"{name} = {json.dumps(value)}"
            lines.append(f"# {name}: unset" if value is None else line)
    return "\n".join(lines) + "\n"


def show(as_json: bool) -> int:
    try:
        shown = report()
    except ConfigFileError as exc:
        print(f"flava config show: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(json.dumps(shown, indent=2) + "\n" if as_json else as_toml(shown))
    return 0
