"""Secrets never reach a log line: credentials in URLs and the values of secret settings.

:func:`install` wraps the log-record factory, so every record any logger of the process makes
(ours, uvicorn's, redis-py's) is redacted before a handler sees it, whatever the handlers are:

- ``scheme://user:password@host`` becomes ``scheme://user:***@host`` (``FLAVA_REDIS_URL``
  with a password, say);
- the value of every environment variable whose name says it is secret (``FLAVA_API_TOKEN``,
  ``*_PASSWORD``, ``*_SECRET``...) and of every password in an environment URL becomes ``***``;
  so do the same in the config file ``FLAVA_CONFIG`` names (``api_token = "..."``, a
  ``redis_url`` with a password; contract/config.py).

``flava`` installs it first thing (flava/cli.py), and so does ``create_app`` (the processes of
``flava serve --workers N`` do not run the CLI). A record's message and its arguments are
redacted one by one, so handlers that read ``record.args`` (uvicorn's access log) still work;
a traceback is formatted and redacted as the record is made.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

from contract.config import ConfigFileError, config_path, read_config

MASK = "***"
# scheme://[user]:password@  (the password: anything up to the @ that ends the userinfo)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<pw>[^@\s]+)@")
_SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|API_KEY|PRIVATE_KEY")
_FORMATTER = logging.Formatter()
_MIN_SECRET = 6  # shorter values (a flag, "true") would mask parts of ordinary lines


def is_secret_name(name: str) -> bool:
    """Whether a variable, setting or config key of this name holds a secret."""
    return bool(_SECRET_NAME.search(name.upper()))


def secrets_from_env(environ: Mapping[str, str]) -> list[str]:
    """The secret values of an environment and of the config file it names: secret-named
    variables (keys) and URL passwords, longest first."""
    found = _secrets_of(environ)
    try:
        found |= _secrets_of(_flat(read_config(config_path(environ))))
    except ConfigFileError:
        pass  # the process's settings refuse to start with it, and say why
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


def _secrets_of(values: Mapping[str, object]) -> set[str]:
    found = {str(v) for name, v in values.items() if is_secret_name(name) and v}
    for value in values.values():
        found.update(m["pw"] for m in _URL_PASSWORD.finditer(str(value)))
    return found


def _flat(config: Mapping[str, object]) -> dict[str, object]:
    """A config file's keys and its tables' keys, in one mapping (``table.key`` for those)."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` with URL passwords and each of ``secrets`` masked."""
    text = _URL_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    for secret in secrets:
        text = text.replace(secret, MASK)
    return text


def install(environ: Mapping[str, str] | None = None) -> None:
    """Redact every log record this process makes from now on (idempotent: the secrets are
    re-read from the environment at each call)."""
    secrets = secrets_from_env(os.environ if environ is None else environ)
    factory = logging.getLogRecordFactory()
    inner = getattr(factory, "redacting", factory)

    def make(*args, **kwargs) -> logging.LogRecord:
        record = inner(*args, **kwargs)
        _redact_record(record, secrets)
        return record

    make.redacting = inner  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make)


def _redact_record(record: logging.LogRecord, secrets: list[str]) -> None:
    if record.exc_info and record.exc_info[0] is not None:  # the traceback, formatted now
        record.exc_text = redact(_FORMATTER.formatException(record.exc_info), secrets)
    if isinstance(record.msg, str):
        record.msg = redact(record.msg, secrets)
    elif record.msg is not None and (text := str(record.msg)) != redact(text, secrets):
        record.msg = redact(text, secrets)
    if isinstance(record.args, tuple):
        record.args = tuple(_redact_arg(a, secrets) for a in record.args)
    elif isinstance(record.args, dict):
        record.args = {k: _redact_arg(v, secrets) for k, v in record.args.items()}


def _redact_arg(arg: object, secrets: list[str]) -> object:
    """A string argument redacted; any other kept as it is unless its text holds a secret
    (then its redacted text: a number never does, so ``%d`` keeps working)."""
    if isinstance(arg, int | float) or arg is None:
        return arg
    text = arg if isinstance(arg, str) else str(arg)
    cleaned = redact(text, secrets)
    return arg if cleaned == text else cleaned
