"""Service units and the LaunchAgent: valid, commented line by line, and in sync with the repository copies."""

from __future__ import annotations

import plistlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlwatchd.service import _template, plan_install, render

REPO = Path(__file__).resolve().parents[1]
SYSTEM_EXAMPLE = {
    "exec": "/opt/dlwatchd/bin/dlwatchd",
    "spool": "/var/lib/dlwatchd/spool",
    "user": "dlwatchd",
    "group": "dlwatchd",
    "state": "/var/lib/dlwatchd",
}
USER_EXAMPLE = {
    "exec": "/home/pathologist/.local/bin/dlwatchd",
    "spool": "/home/pathologist/.local/share/dlwatchd/spool",
    "state": "/home/pathologist/.local/share/dlwatchd /home/pathologist/.cache/dlwatchd",
}
PLIST_EXAMPLE = {
    "label": "org.dlwatchd.agent",
    "exec": "/Users/pathologist/.local/bin/dlwatchd",
    "spool": "/Users/pathologist/Library/Application Support/dlwatchd/spool",
    "log": "/Users/pathologist/Library/Logs/dlwatchd/dlwatchd.log",
}


def test_repository_copies_are_what_install_renders() -> None:
    assert (REPO / "systemd/dlwatchd.service").read_text() == render(_template("dlwatchd.service"), **SYSTEM_EXAMPLE)
    assert (REPO / "systemd/dlwatchd-user.service").read_text() == render(
        _template("dlwatchd-user.service"), **USER_EXAMPLE
    )
    assert (REPO / "launchd/org.dlwatchd.agent.plist").read_text() == render(
        _template("dlwatchd.plist"), **PLIST_EXAMPLE
    )


def settings_of(unit: str) -> dict[str, str]:
    values = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


@pytest.mark.parametrize("name", ["dlwatchd.service", "dlwatchd-user.service"])
def test_every_unit_line_is_commented(name: str) -> None:
    lines = (REPO / "systemd" / name).read_text().splitlines()
    for index, line in enumerate(lines):
        if line and not line.startswith(("#", "[")):
            assert lines[index - 1].startswith("#"), f"{name}: no comment above {line!r}"


def test_system_unit_has_the_service_contract() -> None:
    unit = settings_of((REPO / "systemd/dlwatchd.service").read_text())
    assert unit["Type"] == "notify" and unit["Restart"] == "on-failure" and unit["KillMode"] == "mixed"
    assert int(unit["WatchdogSec"]) > 0 and int(unit["TimeoutStopSec"]) >= 60
    assert unit["NoNewPrivileges"] == "yes" and unit["ProtectSystem"] == "strict" and unit["PrivateTmp"] == "yes"
    assert "/var/lib/dlwatchd/spool" in unit["ReadWritePaths"]
    assert unit["User"] == "dlwatchd" and unit["ProtectHome"] == "read-only"
    assert "PrivateDevices" not in unit, "GPU device nodes must stay visible"
    assert unit["ExecStart"] == "/opt/dlwatchd/bin/dlwatchd run --spool /var/lib/dlwatchd/spool"


def test_user_unit_keeps_the_home_writable() -> None:
    unit = settings_of((REPO / "systemd/dlwatchd-user.service").read_text())
    assert unit["Type"] == "notify" and "ProtectHome" not in unit and "User" not in unit
    assert unit["ProtectSystem"] == "strict" and "PrivateDevices" not in unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("mode", ["system", "user"])
def test_rendered_units_pass_systemd_analyze_verify(mode: str, tmp_path: Path) -> None:
    plan = plan_install(mode, tmp_path / "spool", platform="linux")
    unit = tmp_path / ("dlwatchd.service" if mode == "system" else "dlwatchd-user.service")
    unit.write_text(plan.text)
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for ignored bad settings, so any output at all is a failure
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done.stdout + done.stderr


def test_launch_agent_plist() -> None:
    text = (REPO / "launchd/org.dlwatchd.agent.plist").read_text()
    plist = plistlib.loads(text.encode())
    assert plist["ProgramArguments"] == [
        PLIST_EXAMPLE["exec"], "run", "--spool", PLIST_EXAMPLE["spool"]
    ]  # fmt: skip
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] >= 10 and plist["ExitTimeOut"] >= 60
    assert plist["EnvironmentVariables"]["DLWATCHD_SPOOL"] == PLIST_EXAMPLE["spool"]
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == PLIST_EXAMPLE["log"]
    assert "WatchPaths" not in plist and "QueueDirectories" not in plist
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("    <key>"):  # a top-level key: a comment says why, just above it or its sibling
            assert any(previous.strip().startswith("<!--") for previous in lines[index - 3 : index]), line


def test_install_print_and_real_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    printed = subprocess.run(
        [sys.executable, "-m", "dlwatchd", "service", "install", "--user", "--spool", str(tmp_path / "sp"), "--print"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert printed.returncode == 0, printed.stderr
    assert f"--spool {tmp_path / 'sp'}" in printed.stdout
    assert "systemctl --user enable --now dlwatchd.service" in printed.stdout
    assert not list(tmp_path.rglob("*.service")), "--print writes nothing"
    command = [sys.executable, "-m", "dlwatchd", "service"]
    installed = subprocess.run([*command, "install", "--user"], capture_output=True, text=True, timeout=60)
    assert installed.returncode == 0, installed.stderr
    unit = tmp_path / ".config/systemd/user/dlwatchd.service"
    assert unit.exists() and "Type=notify" in unit.read_text()
    removed = subprocess.run([*command, "uninstall", "--user"], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0 and not unit.exists()


def test_install_refuses_line_breaks_in_values() -> None:
    from dlwatchd.errors import DlwatchdError

    with pytest.raises(DlwatchdError):
        render("ExecStart={exec}", exec="/bin/x\nExecStartPre=/bin/evil")


def test_macos_has_no_system_service() -> None:
    from dlwatchd.errors import DlwatchdError

    with pytest.raises(DlwatchdError):
        plan_install("system", None, platform="darwin")
    plan = plan_install("user", Path("/tmp/sp"), platform="darwin")
    assert plan.path.name == "org.dlwatchd.agent.plist" and "launchctl bootstrap" in plan.enable[-1]
