"""Which filesystem a folder lives on, so a spool on a network share is polled instead of watched.

Network filesystems (NFS, SMB/CIFS, sshfs, 9p, ...) deliver no change events for files that other machines
create, so on them native watching only sees this machine's own writes. The mount table answers the question
without touching the share: on Linux `/proc/self/mountinfo`, elsewhere nothing is known and None is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")

# Filesystem types on which another host may write into the spool without this kernel noticing.
NETWORK_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "davfs",
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.cephfs",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.gcsfuse",
        "fuse.davfs2",
    }
)


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as three-digit octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, filesystem type) of every line of a mountinfo text, in file order; bad lines skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mounts.append((_unescape(fields[4]), tail[0]))
    return mounts


def filesystem_type(folder: Path, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding `folder` (e.g. "ext4", "nfs4"), or None where it cannot be told.

    The longest mount point that contains the folder's real path wins; a later mount over the same point hides
    an earlier one, as it does in the kernel.
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    target = Path(os.path.realpath(folder))
    best: tuple[int, str] | None = None
    for point, fstype in parse_mountinfo(mountinfo):
        if target.is_relative_to(point):
            depth = len(Path(point).parts)
            if best is None or depth >= best[0]:
                best = (depth, fstype)
    return best[1] if best else None


def is_network_filesystem(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_TYPES or fstype.split(".", 1)[0] in NETWORK_TYPES)
