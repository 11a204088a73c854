"""How every ``flava`` process writes its log: one JSON object per line, or text at a terminal.

JSON (for a log system: Loki, Elasticsearch, CloudWatch read it as it is), one event a line:

    {"ts": "2026-11-28T00:15:34.123Z", "level": "warning", "logger": "worker.queue",
     "pid": 812, "msg": "dead-lettering clip 3f2a...: undecodable", "clip_id": "3f2a...",
     "reason": "undecodable"}

The fields a call passes with ``extra={...}`` (``clip_id``, ``version``, ``step``, ``modality``,
``reason``...) become fields of the event; a traceback is ``exc``. Text (for a person at a
terminal): ``<time> <LEVEL> <logger>: <msg> key=value ...``.

``FLAVA_LOG_FORMAT`` (or ``log_format`` in the config file, or ``flava --log-format``):
``auto`` (the default) writes JSON when stderr is not a terminal and text when it is; ``json``
or ``text`` force one. ``FLAVA_LOG_LEVEL`` likewise. Redaction (contract/redact.py) happens
when a record is made, before either formatter sees it.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

from pydantic_settings import SettingsConfigDict

from contract.config import FileSettings

Format = Literal["auto", "json", "text"]
# what every LogRecord carries: anything else on a record came from ``extra=``
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogSettings(FileSettings):
    """The log's level and format: CLI flags, then FLAVA_LOG_*, then the config file (as
    log_level / log_format at its top, or level / format under [logging])."""

    model_config = SettingsConfigDict(env_prefix="FLAVA_LOG_", extra="ignore")
    config_table = "logging"

    level: str = "info"
    format: Format = "auto"


def context(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call added with ``extra=``."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
            **context(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            event["exc"] = record.exc_text
        return json.dumps(event, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, then the ``extra=`` fields as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in context(record).items())
        head, sep, tail = line.partition("\n")  # a traceback goes after the fields
        return f"{head} {fields}{sep}{tail}" if fields else line


def resolve(fmt: Format, stream: IO[str] | None = None) -> Literal["json", "text"]:
    """``auto`` -> ``text`` when ``stream`` (stderr) is a terminal, else ``json``."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    return "text" if hasattr(stream, "isatty") and stream.isatty() else "json"


def formatter(fmt: Literal["json", "text"]) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: Format, stream: IO[str] | None = None) -> Literal["json", "text"]:
    """The root logger writes ``fmt`` lines at ``level`` to ``stream`` (stderr); replaces any
    handler it had. Returns the format chosen (``auto`` resolved)."""
    chosen = resolve(fmt, stream)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(chosen))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return chosen


def uvicorn_log_config(level: str, fmt: Literal["json", "text"]) -> dict[str, Any]:
    """A ``log_config`` for uvicorn: its loggers (errors and the access log) write through our
    formatter, in each of ``flava serve --workers N``'s processes too (uvicorn applies it in
    each)."""
    handler = {"class": "logging.StreamHandler", "formatter": "flava", "stream": "ext://sys.stderr"}
    loggers = {name: {"level": level.upper()} for name in ("uvicorn", "uvicorn.error")}
    loggers["uvicorn.access"] = {"level": level.upper()}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"flava": {"()": f"{__name__}.formatter", "fmt": fmt}},
        "handlers": {"default": handler},
        "loggers": loggers,
        "root": {"handlers": ["default"], "level": level.upper()},
    }
