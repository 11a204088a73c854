"""The config file every ``flava`` process reads: TOML at ``FLAVA_CONFIG``, the environment over it.

    # flava.toml
    redis_url = "redis://:s3cret@redis:6379/0"   # the top level: FLAVA_REDIS_URL, for everyone
    preset = "tiny"
    log_format = "json"                            # FLAVA_LOG_FORMAT
    [api]                                          # the API only (ApiSettings' fields)
    max_backlog = 4000
    [worker]                                       # the learner only (WorkerSettings')
    method = "er"
    [embedder]                                     # FLAVA_EMBEDDER_* (EmbedderSettings')
    threads = 2

The top level is the ``FLAVA_`` environment written as a file: key ``k`` means what the variable
``FLAVA_<K>`` means, to each process that reads that variable. A table (``[api]``,
``[worker]``, ``[embedder]``, ``[logging]``) holds one process's settings by field name and
wins over the top level. Precedence, highest first: values given in code, ``FLAVA_*``
variables, the file's table, the file's top level, the defaults. ``flava config show`` prints
the result for every process, secrets masked, and the keys no process reads.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

CONFIG_ENV = "FLAVA_CONFIG"


class ConfigFileError(ValueError):
    """The file named by FLAVA_CONFIG is missing or not TOML (a process refuses to start)."""


def config_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """The file ``FLAVA_CONFIG`` names, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(CONFIG_ENV, "")
    return Path(value) if value else None


def read_config(path: Path | None) -> dict[str, Any]:
    """The parsed file ({} for no file); a missing or malformed file is a ConfigFileError."""
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigFileError(f"{CONFIG_ENV}={path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"{CONFIG_ENV}={path}: not TOML: {exc}") from None


def env_names(settings_cls: type[BaseSettings], name: str, field: FieldInfo) -> list[str]:
    """The environment variables a field reads (its alias, else prefix + name), upper case."""
    if isinstance(field.validation_alias, str):
        return [field.validation_alias.upper()]
    prefix = settings_cls.model_config.get("env_prefix", "")
    return [f"{prefix}{name}".upper()]


def values_for(
    settings_cls: type[BaseSettings], table: str, config: Mapping[str, Any]
) -> dict[str, Any]:
    """What the file says to ``settings_cls``: its top-level keys by environment name, then
    its own table by field name; keyed as the settings' sources key them (alias or name)."""
    own = config.get(table, {})
    out = {}
    for name, field in settings_cls.model_fields.items():
        key = field.validation_alias if isinstance(field.validation_alias, str) else name
        for env in env_names(settings_cls, name, field):
            top = env.removeprefix("FLAVA_").lower()
            if top in config and not isinstance(config[top], dict):
                out[key] = config[top]
        if name in own:
            out[key] = own[name]
    return out


class ConfigFileSource(PydanticBaseSettingsSource):
    """A pydantic-settings source: the file at FLAVA_CONFIG, for one process's table."""

    def __init__(self, settings_cls: type[BaseSettings], table: str) -> None:
        super().__init__(settings_cls)
        self.values = values_for(settings_cls, table, read_config(config_path()))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self.values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.values)


class FileSettings(BaseSettings):
    """Settings read from the environment and, below it, from the config file's ``table``."""

    config_table: ClassVar[str] = ""  # "api", "worker", "embedder", "logging"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources, highest first, with the config file last (lowest)."""
        file = ConfigFileSource(settings_cls, cls.config_table)
        return (init_settings, env_settings, dotenv_settings, file_secret_settings, file)


def unknown_keys(config: Mapping[str, Any], tables: Mapping[str, type[BaseSettings]]) -> list[str]:
    """Keys of the file that no process reads (a typo, or a setting that was removed)."""
    known_top = {
        env.removeprefix("FLAVA_").lower()
        for cls in tables.values()
        for name, field in cls.model_fields.items()
        for env in env_names(cls, name, field)
    }
    unknown = [k for k, v in config.items() if not isinstance(v, dict) and k not in known_top]
    for table, value in config.items():
        if isinstance(value, dict):
            fields = tables[table].model_fields if table in tables else {}
            unknown += [f"{table}.{k}" for k in value if k not in fields]
    return sorted(unknown)
