"""Shared test settings: tests never touch the real user spool or a real home folder's data."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in ("DLWATCHD_SPOOL", "DLWATCHD_CONFIG", "DLWATCHD_PLUGINS", "DLWATCHD_DAEMON_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (`make test` runs two workers), the Slurm tests share one worker: their session
    fixture starts one throwaway cluster on fixed ports, which a second worker could not start beside it."""
    for item in items:
        if "slurm" in item.path.parts:
            item.add_marker(pytest.mark.xdist_group("slurm"))
