"""The path policy for untrusted request paths (PROTOCOL §8): absolute, POSIX, inside the allowed roots.

Every path a request names (`data_path`, tile paths, `model_path`, `output_dir`) passes through here before
anything is opened or created. Symlinks are followed while checking, so a link inside a root that points out
of it is refused. The file finally read is opened one path component at a time, none of them followed if it
is a symlink (`open_regular_file`), so a file or a folder on the way swapped for a symlink between the check and
the open is refused, and the file read is the file checked.

Torch- and numpy-free: the supervisor validates paths at intake with these functions.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from dlwatchd.errors import DlwatchdError, ErrorCode

# Longer than any real path (PATH_MAX is 4096 on Linux, 1024 on macOS); refused before touching the disk.
MAX_PATH_CHARS = 4096
# `C:` / `c:/...`: a Windows drive path is never meaningful on the daemon's POSIX filesystem.
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_ROOTS_HINT = "Use a path inside the spool or a configured read/write root (--read-root, --write-root)."


def _refuse(field: str, message: str, hint: str | None = None) -> DlwatchdError:
    return DlwatchdError(ErrorCode.PATH_NOT_ALLOWED, message, hint=hint, field=field)


def _shown(raw: str) -> str:
    # The client's own text, quoted and shortened; never the resolved target of a symlink.
    return repr(raw if len(raw) <= 200 else raw[:200] + "...")


def _check_form(raw: object, field: str) -> str:
    """The syntactic rules: a non-empty absolute POSIX path without NUL, `~`, backslashes or drive letters."""
    if not isinstance(raw, str) or not raw:
        raise _refuse(field, f"{field} must be a non-empty absolute path.", "Give the full path, starting with '/'.")
    if "\x00" in raw:
        raise _refuse(field, f"{field} contains a NUL byte, which no file name can hold.")
    if len(raw) > MAX_PATH_CHARS:
        raise _refuse(field, f"{field} is {len(raw)} characters long; the limit is {MAX_PATH_CHARS}.")
    if raw.startswith("~"):
        # Expanding `~` would resolve against the daemon user's home, not the client's.
        raise _refuse(
            field, f"{field} {_shown(raw)} starts with '~', which is not expanded.", "Give the full path instead."
        )
    if "\\" in raw or _DRIVE_RE.match(raw) or raw.startswith("//"):
        raise _refuse(
            field,
            f"{field} {_shown(raw)} is a Windows or network (UNC) path; the daemon reads POSIX paths only.",
            "Give the path as the daemon's machine sees it, for example /mnt/share/....",
        )
    if not raw.startswith("/"):
        raise _refuse(
            field,
            f"{field} {_shown(raw)} is a relative path; paths must be absolute.",
            "Give the full path, starting with '/'.",
        )
    return raw


def _resolve(raw: str, roots: list[Path], field: str) -> Path:
    checked = _check_form(raw, field)
    # realpath (non-strict) follows every existing link and appends missing components lexically, so neither
    # a link on the way nor `missing/../..` can leave a root unnoticed; it never raises for absent paths.
    try:
        target = Path(os.path.realpath(checked))
    except OSError as exc:
        # A component vanished or turned into a link loop while it was being resolved (a concurrent swap).
        code = ErrorCode.NOT_FOUND if isinstance(exc, FileNotFoundError) else ErrorCode.PATH_NOT_ALLOWED
        raise DlwatchdError(code, f"{field} {_shown(raw)} cannot be resolved: {exc.strerror}.", field=field) from None
    if not any(target.is_relative_to(os.path.realpath(root)) for root in roots):
        raise _refuse(field, f"{field} {_shown(raw)} is outside the allowed folders.", _ROOTS_HINT)
    return target


def resolve_read_path(raw: str, roots: list[Path], *, field: str) -> Path:
    """The real path (symlinks followed) of `raw`, which must lie inside one of `roots`.

    Raises DlwatchdError(E_PATH_NOT_ALLOWED, field=field) for NUL bytes, `~`, Windows/UNC forms, relative paths
    and anything whose real path is outside every root. A missing path is not an error here.
    """
    return _resolve(raw, roots, field)


def resolve_write_dir(raw: str, roots: list[Path], *, field: str) -> Path:
    """The real path of an output folder that may not exist yet; it must lie inside one of `roots`.

    The nearest existing ancestor is resolved (symlinks followed) and the missing rest appended, so a link
    anywhere on the way out of a root is refused. Same errors as `resolve_read_path`; creating the folder and
    checking that it is a folder are the caller's business.
    """
    return _resolve(raw, roots, field)


def open_regular_file(path: Path) -> int:
    """Open `path` read-only, following no symlink anywhere on the way; returns the fd (the caller closes it).

    `path` is an absolute real path (as `resolve_read_path` returns it). Each folder on the way is opened
    relative to the previous one without following links, so a folder or the file itself swapped for a symlink
    after the path check is refused instead of leading out of the roots. Raises E_PATH_NOT_ALLOWED for a
    symlink (or a `.`/`..` component) on the way, E_NOT_FOUND if something is missing, E_PERMISSION if
    unreadable, E_IMAGE_READ if it is not a regular file (folder, FIFO, device) or cannot be opened otherwise.
    """
    path = Path(path)
    # O_NONBLOCK keeps a FIFO planted under an image's name from blocking the worker in open().
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    if not path.is_absolute() or os.open not in os.supports_dir_fd:
        fd = _open_component(path, str(path), flags, None)
    else:
        parts = path.parts
        dir_fd = os.open(parts[0], os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0))
        try:
            for index, name in enumerate(parts[1:-1], start=2):
                folder_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_DIRECTORY", 0)
                next_fd = _open_component(Path(*parts[:index]), name, folder_flags, dir_fd, folder=True)
                os.close(dir_fd)
                dir_fd = next_fd
            fd = _open_component(path, parts[-1], flags, dir_fd)
        finally:
            os.close(dir_fd)
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"The file {path} cannot be examined: {exc.strerror}.") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"{path} is not a regular file.")
    return fd


def _open_component(shown: Path, name: str, flags: int, dir_fd: int | None, *, folder: bool = False) -> int:
    """Open one component `name` (relative to `dir_fd`, when given) without following it; errors name `shown`."""
    what = "folder" if folder else "file"
    if name in (".", ".."):
        raise DlwatchdError(ErrorCode.PATH_NOT_ALLOWED, f"The path {shown} holds a '{name}' component.")
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The {what} {shown} does not exist.") from None
    except PermissionError:
        raise DlwatchdError(ErrorCode.PERMISSION, f"The daemon may not read the {what} {shown}.") from None
    except OSError as exc:
        # With O_NOFOLLOW, ELOOP means the component was a link when it was opened, even if it has been swapped
        # back by the time anyone looks again; other errors get that second look.
        is_link = exc.errno == errno.ELOOP
        if not is_link:
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
        if is_link:
            raise DlwatchdError(
                ErrorCode.PATH_NOT_ALLOWED,
                f"The {what} {shown} is a symbolic link; links are not followed when files are opened.",
                hint="Replace the link with the file or folder itself.",
            ) from None
        if folder:
            raise DlwatchdError(ErrorCode.NOT_FOUND, f"The folder {shown} cannot be opened: {exc.strerror}.") from None
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"The file {shown} cannot be opened: {exc.strerror}.") from None
