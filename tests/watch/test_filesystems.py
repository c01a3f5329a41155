"""The mount table decides whether `auto` watching polls: network filesystems are polled, local ones watched."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlwatchd.watch import hints
from dlwatchd.watch.filesystems import filesystem_type, is_network_filesystem, parse_mountinfo

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 0:35 / /mnt/lab rw,relatime shared:20 - nfs4 server:/export/lab rw,vers=4.2
41 40 0:36 / /mnt/lab/scratch rw,relatime shared:21 - tmpfs tmpfs rw
42 22 0:37 / /mnt/with\\040space rw - cifs //srv/share rw
43 22 0:38 / /home/me/remote rw - fuse.sshfs me@host:/data rw
garbage line without separator
"""


def test_parse_mountinfo_reads_points_and_types_and_skips_bad_lines() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[0] == ("/", "ext4")
    assert ("/mnt/with space", "cifs") in mounts
    assert len(mounts) == 5


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("/var/spool/dlwatchd", "ext4"),
        ("/mnt/lab/spool", "nfs4"),
        ("/mnt/lab", "nfs4"),
        ("/mnt/lab/scratch/spool", "tmpfs"),  # the deeper mount wins
        ("/mnt/laboratory", "ext4"),  # a name prefix is not a parent folder
        ("/mnt/with space/spool", "cifs"),
        ("/home/me/remote/spool", "fuse.sshfs"),
    ],
)
def test_the_longest_containing_mount_point_wins(folder: str, expected: str) -> None:
    assert filesystem_type(Path(folder), MOUNTINFO) == expected


def test_a_later_mount_over_the_same_point_hides_the_earlier() -> None:
    text = MOUNTINFO + "50 22 0:40 / /mnt/lab rw - ext4 /dev/vdb rw\n"
    assert filesystem_type(Path("/mnt/lab/spool"), text) == "ext4"


@pytest.mark.parametrize(
    ("fstype", "network"),
    [("nfs", True), ("nfs4", True), ("cifs", True), ("smb3", True), ("fuse.sshfs", True), ("9p", True)]
    + [("ext4", False), ("xfs", False), ("tmpfs", False), ("overlay", False), ("fuse.portal", False), (None, False)],
)
def test_network_filesystems_are_recognised(fstype: str | None, network: bool) -> None:
    assert is_network_filesystem(fstype) is network


def test_this_machines_tmp_has_a_known_type(tmp_path: Path) -> None:
    if not Path("/proc/self/mountinfo").exists():
        pytest.skip("no /proc/self/mountinfo on this platform")
    assert filesystem_type(tmp_path)


@pytest.mark.parametrize(
    ("requested", "fstype", "mode", "reason"),
    [
        ("auto", "nfs4", "polling", "the spool is on a network filesystem (nfs4)"),
        ("auto", "ext4", "native", None),
        ("native", "nfs4", "native", None),  # an explicit choice is honoured
        ("polling", "ext4", "polling", None),
    ],
)
def test_the_watch_mode_follows_the_setting_and_the_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, requested: str, fstype: str, mode: str, reason: str | None
) -> None:
    for name in ("incoming", "queued", "running"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(hints, "filesystem_type", lambda folder: fstype)
    watcher = hints.HintWatcher(tmp_path, requested, hints.Wakeup())
    watcher.start()
    try:
        assert watcher.mode == mode
        assert watcher.alive
        assert watcher.reason == reason
    finally:
        watcher.stop()
