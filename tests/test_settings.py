"""settings.py: defaults < TOML file < DLWATCHD_* environment < explicit overrides, with clear errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import platformdirs
import pytest

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.settings import default_spool, load_settings
from dlwatchd.spool.layout import short_hostname


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def settings_error(**kwargs: object) -> DlwatchdError:
    with pytest.raises(DlwatchdError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value


# --- defaults --------------------------------------------------------------------------------


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    settings = load_settings(environ={})
    assert settings.spool == default_spool()
    assert settings.watch == "auto"
    assert settings.rescan_interval == 2.0
    assert settings.daemon_id == f"{short_hostname()}-1"
    assert settings.read_roots == [] and settings.write_roots == []
    assert settings.max_request_bytes == 32 * 1024 * 1024
    assert settings.retention.done_days == 14


def test_the_default_spool_is_in_the_platform_user_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    expected = Path(platformdirs.user_data_dir("dlwatchd", appauthor=False)) / "spool"
    assert load_settings(environ={}).spool == expected
    if sys.platform.startswith("linux"):
        assert expected == tmp_path / "data" / "dlwatchd" / "spool"


def test_effective_read_roots_are_the_spool_and_home_by_default(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"spool": tmp_path / "spool"})
    assert settings.effective_read_roots() == [tmp_path / "spool", Path.home()]
    assert settings.effective_write_roots() == [tmp_path / "spool"]


def test_configured_read_roots_replace_home(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"spool": tmp_path / "spool", "read_roots": [tmp_path / "slides"]})
    assert settings.effective_read_roots() == [tmp_path / "spool", tmp_path / "slides"]


def test_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={}, overrides={"spool": "rel/spool", "read_roots": ["~/slides"]})
    assert settings.spool == tmp_path / "rel" / "spool"
    assert settings.read_roots == [Path.home() / "slides"]


# --- layers ----------------------------------------------------------------------------------


def test_a_toml_file_overrides_the_defaults(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "dlwatchd.toml",
        f'spool = "{tmp_path / "from-file"}"\nwatch = "polling"\nrescan_interval = 5\n'
        'daemon_id = "file-1"\n[retention]\ndone_days = 3\n',
    )
    settings = load_settings(config_file=config, environ={})
    assert settings.spool == tmp_path / "from-file"
    assert settings.watch == "polling"
    assert settings.rescan_interval == 5.0
    assert settings.daemon_id == "file-1"
    assert settings.retention.done_days == 3
    assert settings.retention.failed_days == 30


def test_a_dlwatchd_table_in_toml_works(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "pyproject-like.toml",
        '[tool]\nother = 1\n\n[dlwatchd]\nwatch = "polling"\nrescan_interval = 0.5\n',
    )
    settings = load_settings(config_file=config, environ={})
    assert settings.watch == "polling"
    assert settings.rescan_interval == 0.5


def test_a_setting_outside_the_dlwatchd_table_is_an_error_not_ignored(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", '[dlwatchd]\nwatch = "polling"\n\n[retention]\ndone_days = 3\n')
    with pytest.raises(DlwatchdError) as error:
        load_settings(config_file=config, environ={})
    assert error.value.code == ErrorCode.SCHEMA
    assert "retention" in error.value.message and "[dlwatchd.retention]" in (error.value.hint or "")


def test_a_retention_table_inside_the_dlwatchd_table_works(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", '[dlwatchd]\nwatch = "polling"\n\n[dlwatchd.retention]\ndone_days = 3\n')
    assert load_settings(config_file=config, environ={}).retention.done_days == 3


def test_the_environment_overrides_the_file(tmp_path: Path) -> None:
    config = write_toml(
        tmp_path / "c.toml",
        f'spool = "{tmp_path / "from-file"}"\nwatch = "native"\nrescan_interval = 5\ndaemon_id = "file-1"\n'
        f'read_roots = ["{tmp_path / "file-root"}"]\n',
    )
    environ = {
        "DLWATCHD_SPOOL": str(tmp_path / "from-env"),
        "DLWATCHD_WATCH": "polling",
        "DLWATCHD_RESCAN_INTERVAL": "0.25",
        "DLWATCHD_DAEMON_ID": "env-2",
        "DLWATCHD_READ_ROOTS": os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]),
    }
    settings = load_settings(config_file=config, environ=environ)
    assert settings.spool == tmp_path / "from-env"
    assert settings.watch == "polling"
    assert settings.rescan_interval == 0.25
    assert settings.daemon_id == "env-2"
    assert settings.read_roots == [tmp_path / "a", tmp_path / "b"]


def test_overrides_beat_the_environment_and_none_means_not_given(tmp_path: Path) -> None:
    environ = {"DLWATCHD_SPOOL": str(tmp_path / "from-env"), "DLWATCHD_WATCH": "polling"}
    settings = load_settings(environ=environ, overrides={"spool": tmp_path / "from-flag", "watch": None})
    assert settings.spool == tmp_path / "from-flag"
    assert settings.watch == "polling"


def test_empty_environment_values_are_ignored(tmp_path: Path) -> None:
    settings = load_settings(environ={"DLWATCHD_WATCH": "", "DLWATCHD_READ_ROOTS": ""})
    assert settings.watch == "auto"
    assert settings.read_roots == []


def test_dlwatchd_config_names_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'watch = "polling"\n')
    assert load_settings(environ={"DLWATCHD_CONFIG": str(config)}).watch == "polling"


# --- errors ----------------------------------------------------------------------------------


def test_an_invalid_environment_value_names_the_setting_and_its_source() -> None:
    error = settings_error(environ={"DLWATCHD_RESCAN_INTERVAL": "fast"})
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "rescan_interval"
    assert "'rescan_interval'" in error.message
    assert "environment" in error.message


def test_an_invalid_file_value_names_the_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'watch = "inotify"\n')
    error = settings_error(config_file=config, environ={})
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "watch"
    assert f"config file {config}" in error.message


def test_an_invalid_nested_file_value_names_its_path(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "[retention]\ndone_days = -1\n")
    error = settings_error(config_file=config, environ={})
    assert error.field == "retention.done_days"
    assert "'retention.done_days'" in error.message and str(config) in error.message


def test_an_invalid_override_names_the_command_line() -> None:
    error = settings_error(environ={}, overrides={"daemon_id": "no spaces please"})
    assert error.field == "daemon_id"
    assert "command line" in error.message


def test_the_source_is_the_layer_that_won(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", 'watch = "polling"\n')
    error = settings_error(config_file=config, environ={"DLWATCHD_WATCH": "bogus"})
    assert "environment" in error.message
    assert "config file" not in error.message


def test_an_unknown_setting_in_the_file_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "rescan_intervall = 3\n")
    error = settings_error(config_file=config, environ={})
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "rescan_intervall"


def test_a_missing_config_file_is_not_found(tmp_path: Path) -> None:
    error = settings_error(config_file=tmp_path / "nope.toml", environ={})
    assert error.code is ErrorCode.NOT_FOUND
    assert "nope.toml" in error.message


def test_a_broken_config_file_is_a_schema_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path / "c.toml", "watch = \n")
    error = settings_error(config_file=config, environ={})
    assert error.code is ErrorCode.SCHEMA
    assert str(config) in error.message


def test_a_daemon_id_with_a_trailing_newline_is_refused() -> None:
    error = settings_error(environ={"DLWATCHD_DAEMON_ID": "host-1\n"})
    assert error.field == "daemon_id"
