"""The log lines (contract/logs.py): JSON events with their fields, text at a terminal,
secrets redacted in either."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from contract import redact
from contract.logs import JsonFormatter, TextFormatter, configure, resolve, uvicorn_log_config

TOKEN = "tok-9f8e7d6c5b"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured():
    """The root logger writes to a buffer for the test; its handlers and level come back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


@pytest.fixture
def redacting():
    factory = logging.getLogRecordFactory()
    redact.install({"FLAVA_API_TOKEN": TOKEN})
    yield
    logging.setLogRecordFactory(factory)


def test_auto_is_text_at_a_terminal_and_json_elsewhere():
    assert resolve("auto", Terminal()) == "text"
    assert resolve("auto", io.StringIO()) == "json"
    assert resolve("json", Terminal()) == "json" and resolve("text", io.StringIO()) == "text"


def test_json_is_one_event_per_line_with_the_calls_fields(captured, redacting):
    out = io.StringIO()
    assert configure("info", "auto", out) == "json"
    log = logging.getLogger("worker.queue")
    log.warning("dead-lettering clip %s: %s", "abc", "undecodable", extra={"clip_id": "abc" * 20})
    log.info("model %s published", "1.50", extra={"version": "1.50", "step": 50})
    log.debug("not at info")
    try:
        raise RuntimeError(f"boom with {TOKEN}\nsecond line")
    except RuntimeError:
        log.exception("step failed", extra={"step": 7})
    lines = out.getvalue().splitlines()
    events = [json.loads(line) for line in lines]
    assert len(events) == 3  # one line each, the traceback inside its event
    first, second, third = events
    assert first["msg"] == "dead-lettering clip abc: undecodable"
    assert (first["level"], first["logger"], first["clip_id"]) == (
        "warning",
        "worker.queue",
        "abc" * 20,
    )
    assert second["version"] == "1.50" and second["step"] == 50
    assert {"ts", "pid"} <= set(second) and second["ts"].endswith("+00:00")
    assert third["step"] == 7 and "RuntimeError: boom with ***" in third["exc"]
    assert TOKEN not in out.getvalue()


def test_text_keeps_the_classic_line_and_adds_the_fields(captured, redacting):
    out = Terminal()
    assert configure("info", "auto", out) == "text"
    logging.getLogger("service.app").info(f"token {TOKEN} seen", extra={"clip_id": "c1"})
    line = out.getvalue().rstrip("\n")
    assert line.endswith("INFO service.app: token *** seen clip_id=c1")
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)


def test_the_formatters_leave_the_record_untouched_for_other_handlers():
    record = logging.makeLogRecord({"msg": "x %s", "args": ("y",), "clip_id": "c"})
    assert json.loads(JsonFormatter().format(record))["clip_id"] == "c"
    assert TextFormatter().format(record).endswith("x y clip_id=c")
    assert record.getMessage() == "x y"


def test_uvicorn_logs_through_our_formatter(captured):
    logging.config.dictConfig(uvicorn_log_config("info", "json"))
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler.formatter, JsonFormatter)
    assert logging.getLogger("uvicorn.access").propagate  # reaches the root's handler
