"""One Settings model: defaults from platformdirs, then a TOML config file, then DLWATCHD_* variables, then flags."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.slurm.config import SlurmSettings
from dlwatchd.spool.layout import DAEMON_ID_RE, short_hostname

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

APP_NAME = "dlwatchd"
ENV_PREFIX = "DLWATCHD_"


def default_spool() -> Path:
    """The `spool` folder inside the platform's per-user data directory for dlwatchd."""
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False)) / "spool"


def default_weights_dir() -> Path:
    """The offline weights store inside the platform's per-user data directory."""
    from platformdirs import user_data_dir

    return Path(user_data_dir(APP_NAME, appauthor=False)) / "weights"


def default_daemon_id() -> str:
    return f"{short_hostname()}-1"


class Retention(BaseModel):
    """How long terminal jobs are kept (PROTOCOL.md section 10)."""

    model_config = ConfigDict(extra="forbid")

    done_days: float = Field(14.0, ge=0, le=36500)
    failed_days: float = Field(30.0, ge=0, le=36500)
    cancelled_days: float = Field(7.0, ge=0, le=36500)
    acked_hours: float = Field(1.0, ge=0, le=876000)
    tmp_hours: float = Field(36.0, ge=1, le=876000)
    interval_s: float = Field(3600.0, ge=1, le=86400)


class Settings(BaseModel):
    """Everything a daemon needs to run; built once in the CLI and passed down."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    spool: Path = Field(default_factory=default_spool)
    daemon_id: str = Field(default_factory=default_daemon_id)
    read_roots: list[Path] = Field(default_factory=list, description="extra read roots; default: the user's home")
    write_roots: list[Path] = Field(default_factory=list)
    watch: Literal["auto", "native", "polling"] = Field(
        "auto", description="auto: polling when the spool is on a network filesystem, native events elsewhere"
    )
    rescan_interval: float = Field(2.0, ge=0.05, le=3600)
    heartbeat_interval: float = Field(2.0, ge=0.1, le=60)
    dead_after: float = Field(30.0, ge=1, le=3600, description="seconds a heartbeat may stand still")
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    stop_timeout: float = Field(60.0, ge=1, le=3600)
    retention: Retention = Field(default_factory=Retention)
    plugins: list[str] = Field(default_factory=list, description="modules that register extra job kinds")
    warm_workers: bool = Field(True, description="load torch in each worker at start, before the first job")
    weights_dir: Path = Field(default_factory=default_weights_dir, description="offline encoder weights store")
    model_dirs: list[Path] = Field(default_factory=list, description="extra folders of models to list and run")
    http_port: int | None = Field(None, ge=1, le=65535, description="localhost-only read-only HTTP shim")
    executor: Literal["local", "slurm"] = Field("local", description="where train and inference jobs run")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)

    @field_validator("daemon_id")
    @classmethod
    def _daemon_id_shape(cls, value: str) -> str:
        if not DAEMON_ID_RE.match(value):
            raise ValueError("a daemon id is 1-64 characters of letters, digits, '_', '.', '-'")
        return value

    @field_validator("spool", mode="after")
    @classmethod
    def _absolute_spool(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("weights_dir", mode="after")
    @classmethod
    def _absolute_weights_dir(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @field_validator("read_roots", "write_roots", "model_dirs", mode="after")
    @classmethod
    def _absolute_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser().absolute() for p in value]

    def effective_read_roots(self) -> list[Path]:
        """The spool plus the configured read roots (the user's home when none are configured)."""
        extra = self.read_roots or [Path.home()]
        return [self.spool, *extra]

    def effective_write_roots(self) -> list[Path]:
        return [self.spool, *self.write_roots]

    def effective_model_dirs(self) -> list[Path]:
        """The spool's models/ first (trainings publish there), then the configured model folders."""
        return [self.spool / "models", *self.model_dirs]


_ENV_FIELDS: dict[str, str] = {
    "SPOOL": "spool",
    "DAEMON_ID": "daemon_id",
    "READ_ROOTS": "read_roots",
    "WRITE_ROOTS": "write_roots",
    "WATCH": "watch",
    "RESCAN_INTERVAL": "rescan_interval",
    "HEARTBEAT_INTERVAL": "heartbeat_interval",
    "DEAD_AFTER": "dead_after",
    "PLUGINS": "plugins",
    "WARM_WORKERS": "warm_workers",
    "STOP_TIMEOUT": "stop_timeout",
    "WEIGHTS_DIR": "weights_dir",
    "MODEL_DIRS": "model_dirs",
    "HTTP_PORT": "http_port",
    "EXECUTOR": "executor",
}
_LIST_FIELDS = {"read_roots", "write_roots", "model_dirs", "plugins"}


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Settings fields named by DLWATCHD_* variables; list values are os.pathsep-separated."""
    values: dict[str, Any] = {}
    for suffix, field in _ENV_FIELDS.items():
        raw = environ.get(ENV_PREFIX + suffix)
        if raw is None or raw == "":
            continue
        if field in _LIST_FIELDS:
            separator = "," if field == "plugins" else os.pathsep
            values[field] = [part for part in raw.split(separator) if part]
        else:
            values[field] = raw
    return values


def read_config_file(path: Path) -> dict[str, Any]:
    """The settings table of a TOML config file: its top level, or its `[dlwatchd]` table when it has one.

    With a `[dlwatchd]` table the other top-level tables belong to other tools and are skipped, but a setting's
    name among them (`[retention]`, `spool = ...`) is an error (E_SCHEMA): it would otherwise be dropped silently.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The config file {path} does not exist.") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise DlwatchdError(ErrorCode.SCHEMA, f"The config file {path} cannot be read: {exc}.") from exc
    if "dlwatchd" not in data:
        return data
    table = data["dlwatchd"]
    if not isinstance(table, dict):
        raise DlwatchdError(ErrorCode.SCHEMA, f"In the config file {path}, 'dlwatchd' must be a table.")
    outside = sorted(set(data) & set(Settings.model_fields))
    if outside:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The config file {path} has a [dlwatchd] table, so {', '.join(outside)} outside it would be ignored.",
            hint=f"Move {', '.join(outside)} into the [dlwatchd] table (e.g. [dlwatchd.retention]).",
            field=outside[0],
        )
    return dict(table)


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge defaults < config file < environment < explicit overrides into one validated Settings.

    Raises DlwatchdError(E_SCHEMA) naming the setting and its source on an invalid value.
    """
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append((f"config file {config_file}", read_config_file(config_file)))
    layers.append(("environment", env_overrides(environ)))
    layers.append(("command line", {k: v for k, v in (overrides or {}).items() if v is not None}))
    merged: dict[str, Any] = {}
    for _, layer in layers:
        merged.update(layer)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        source = next((name for name, layer in reversed(layers) if where.split(".")[0] in layer), "defaults")
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The setting '{where}' from the {source} is invalid: {first['msg']}.",
            field=where,
        ) from exc
