"""Installing dlwatchd as a service: systemd units on Linux, a LaunchAgent on macOS.

The templates live in dlwatchd/service_templates/; rendering fills in this machine's facts (the real
path of the `dlwatchd` executable, the spool, the user) so the unit runs exactly this installation.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dlwatchd.errors import DlwatchdError, ErrorCode

LAUNCHD_LABEL = "org.dlwatchd.agent"
SYSTEM_STATE = Path("/var/lib/dlwatchd")


@dataclass(frozen=True)
class ServicePlan:
    """What `service install` writes, where, and the commands that enable it."""

    kind: str  # "systemd-system" | "systemd-user" | "launchd"
    path: Path
    text: str
    enable: list[str]
    disable: list[str]


def dlwatchd_executable() -> str:
    """The absolute path of the `dlwatchd` script of this installation (falls back to `python -m dlwatchd`)."""
    beside = Path(sys.executable).with_name("dlwatchd")
    if beside.exists():
        return str(beside)
    found = shutil.which("dlwatchd")
    return str(Path(found).resolve()) if found else f"{sys.executable} -m dlwatchd"


def _template(name: str) -> str:
    return resources.files("dlwatchd").joinpath("service_templates").joinpath(name).read_text(encoding="utf-8")


def render(template: str, **values: str) -> str:
    """Fill `{name}` placeholders; a value with a newline or NUL is refused (it could inject unit lines)."""
    for key, value in values.items():
        if "\n" in value or "\0" in value:
            raise DlwatchdError(ErrorCode.SCHEMA, f"The {key} for the service may not contain a line break.")
    out = template
    for key, value in values.items():
        out = out.replace("{" + key + "}", value)
    return out


def _systemd_quote(path: str) -> str:
    """A path as one systemd word (quoted when it holds spaces)."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def plan_install(mode: str, spool: Path | None, platform: str = sys.platform) -> ServicePlan:
    """The unit or plist for this machine. `mode` is "user" or "system"; launchd supports "user" only.

    Raises DlwatchdError(E_SCHEMA) for a system service on macOS.
    """
    executable = dlwatchd_executable()
    user = pwd.getpwuid(os.getuid())
    if platform == "darwin":
        if mode == "system":
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                "On macOS dlwatchd installs as a LaunchAgent of the logged-in user only.",
                hint="Run `dlwatchd service install --user`.",
            )
        home = Path.home()
        spool = spool or home / "Library/Application Support/dlwatchd/spool"
        text = render(
            _template("dlwatchd.plist"),
            label=LAUNCHD_LABEL,
            exec=executable,
            spool=str(spool),
            log=str(home / "Library/Logs/dlwatchd/dlwatchd.log"),
        )
        path = home / "Library/LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        domain = f"gui/{os.getuid()}"
        return ServicePlan(
            "launchd",
            path,
            text,
            enable=[
                f"mkdir -p {shlex.quote(str(home / 'Library/Logs/dlwatchd'))}",
                f"launchctl bootstrap {domain} {shlex.quote(str(path))}",
            ],
            disable=[f"launchctl bootout {domain}/{LAUNCHD_LABEL}"],
        )
    if mode == "system":
        spool = spool or SYSTEM_STATE / "spool"
        service_user = "dlwatchd"
        text = render(
            _template("dlwatchd.service"),
            exec=_systemd_quote(executable),
            spool=_systemd_quote(str(spool)),
            user=service_user,
            group=service_user,
            state=str(SYSTEM_STATE),
        )
        path = Path("/etc/systemd/system/dlwatchd.service")
        return ServicePlan(
            "systemd-system",
            path,
            text,
            enable=[
                f"id {service_user} >/dev/null 2>&1 || "
                f"useradd --system --home-dir {SYSTEM_STATE} --shell /usr/sbin/nologin {service_user}",
                "systemctl daemon-reload",
                "systemctl enable --now dlwatchd.service",
            ],
            disable=["systemctl disable --now dlwatchd.service", "systemctl daemon-reload"],
        )
    from platformdirs import user_cache_dir, user_data_dir

    data = Path(user_data_dir("dlwatchd", appauthor=False))
    spool = spool or data / "spool"
    text = render(
        _template("dlwatchd-user.service"),
        exec=_systemd_quote(executable),
        spool=_systemd_quote(str(spool)),
        state=f"{_systemd_quote(str(data))} {_systemd_quote(user_cache_dir('dlwatchd', appauthor=False))}",
    )
    path = Path.home() / ".config/systemd/user/dlwatchd.service"
    return ServicePlan(
        "systemd-user",
        path,
        text,
        enable=[
            "systemctl --user daemon-reload",
            "systemctl --user enable --now dlwatchd.service",
            f"loginctl enable-linger {shlex.quote(user.pw_name)}   # keep it running without a login session",
        ],
        disable=["systemctl --user disable --now dlwatchd.service", "systemctl --user daemon-reload"],
    )


def install(plan: ServicePlan) -> None:
    """Write the unit or plist (creating its folder); raises E_PERMISSION when the folder is not writable."""
    try:
        plan.path.parent.mkdir(parents=True, exist_ok=True)
        plan.path.write_text(plan.text, encoding="utf-8")
    except PermissionError as exc:
        raise DlwatchdError(
            ErrorCode.PERMISSION,
            f"Cannot write {plan.path}: {exc.strerror}.",
            hint="Run the system install as root (sudo), or install a user service with --user.",
        ) from exc


def uninstall(plan: ServicePlan) -> bool:
    """Remove the unit or plist; False when it was not installed."""
    try:
        plan.path.unlink()
    except FileNotFoundError:
        return False
    return True
