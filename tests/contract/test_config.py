"""The config file (contract/config.py): what each process takes from it, and what wins."""

from __future__ import annotations

import pytest

from contract.config import (
    ConfigFileError,
    config_path,
    read_config,
    unknown_keys,
    values_for,
)
from contract.logs import LogSettings
from contract.redact import secrets_from_env
from service.settings import ApiSettings
from worker.settings import EmbedderSettings, WorkerSettings

FILE = """
redis_url = "redis://:file-pass-123@redis:6379/0"
preset = "small"
max_backlog = 17
log_format = "json"
monitor_compat_lags = [1, 3]
[api]
max_backlog = 42
api_token = "file-token-abcdef"
[worker]
method = "er"
[embedder]
threads = 3
[logging]
level = "debug"
"""


@pytest.fixture
def config(tmp_path, monkeypatch):
    path = tmp_path / "flava.toml"
    path.write_text(FILE)
    for name in ("FLAVA_MAX_BACKLOG", "FLAVA_METHOD", "FLAVA_PRESET", "FLAVA_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FLAVA_CONFIG", str(path))
    return path


def test_each_process_takes_the_top_level_and_its_own_table(config):
    api, worker, embedder = ApiSettings(), WorkerSettings(), EmbedderSettings()
    assert api.redis_url == worker.redis_url == embedder.redis_url  # FLAVA_REDIS_URL, shared
    assert api.redis_url == "redis://:file-pass-123@redis:6379/0"
    assert (api.preset, worker.preset) == ("small", "small")
    assert api.max_backlog == 42  # [api] over the top level's 17
    assert api.api_token == "file-token-abcdef" and worker.method == "er"
    assert worker.monitor_compat_lags == (1, 3)  # a TOML list, not the env's "1,3"
    assert embedder.threads == 3 and embedder.device == "cpu"  # FLAVA_DEVICE is not its
    logs = LogSettings()
    assert (logs.level, logs.format) == ("debug", "json")  # log_format at the top, [logging]


def test_environment_overrides_the_file_and_code_overrides_both(config, monkeypatch):
    monkeypatch.setenv("FLAVA_MAX_BACKLOG", "7")
    monkeypatch.setenv("FLAVA_METHOD", "derpp")
    monkeypatch.setenv("FLAVA_EMBEDDER_THREADS", "5")
    assert ApiSettings().max_backlog == 7  # over [api] as well as the top level
    assert WorkerSettings().method == "derpp" and EmbedderSettings().threads == 5
    assert ApiSettings(max_backlog=3).max_backlog == 3


def test_without_a_file_the_defaults_and_the_environment_rule(monkeypatch):
    monkeypatch.delenv("FLAVA_CONFIG", raising=False)
    monkeypatch.delenv("FLAVA_MAX_BACKLOG", raising=False)
    assert config_path() is None and read_config(None) == {}
    assert ApiSettings().max_backlog == ApiSettings.model_fields["max_backlog"].default


def test_a_file_value_is_validated_like_the_environment(config):
    config.write_text('[worker]\nbatch_size = "many"\n')
    with pytest.raises(ValueError, match="batch_size"):
        WorkerSettings()


@pytest.mark.parametrize("text", [None, "this is = = not toml", b"\xff\xfe"])
def test_a_missing_or_malformed_file_is_refused_with_its_name(config, text):
    if text is None:
        config.unlink()
    elif isinstance(text, bytes):
        config.write_bytes(text)
    else:
        config.write_text(text)
    with pytest.raises(ConfigFileError, match=str(config)):
        ApiSettings()


def test_keys_no_process_reads_are_named(config):
    tables = {"api": ApiSettings, "worker": WorkerSettings, "embedder": EmbedderSettings}
    parsed = read_config(config) | {"redis_ulr": "x", "api": {"max_backlog": 1, "methd": 2}}
    assert unknown_keys(parsed, tables | {"logging": LogSettings}) == ["api.methd", "redis_ulr"]
    assert unknown_keys({"embedder_threads": 2, "log_level": "x"}, tables) == ["log_level"]


def test_the_embedder_reads_its_own_top_level_names():
    """FLAVA_EMBEDDER_THREADS as the key embedder_threads; FLAVA_MODELS_DIR as models_dir."""
    got = values_for(EmbedderSettings, "embedder", {"embedder_threads": 2, "models_dir": "m"})
    assert got == {"threads": 2, "FLAVA_MODELS_DIR": "m"}


def test_the_files_secrets_are_redacted_from_the_logs(config):
    secrets = secrets_from_env({"FLAVA_CONFIG": str(config)})
    assert "file-token-abcdef" in secrets and "file-pass-123" in secrets
    assert "small" not in secrets and "er" not in secrets
