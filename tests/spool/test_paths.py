"""The path policy for untrusted request paths: form rules, roots, symlinks, and opening without following links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.paths import open_regular_file, resolve_read_path, resolve_write_dir


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.png").write_bytes(b"x")
    return folder


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("secret")
    return folder


def _refused(raw: str, roots: list[Path], field: str = "data_path", *, write: bool = False) -> DlwatchdError:
    resolve = resolve_write_dir if write else resolve_read_path
    with pytest.raises(DlwatchdError) as info:
        resolve(raw, roots, field=field)
    assert info.value.code == ErrorCode.PATH_NOT_ALLOWED
    assert info.value.field == field
    assert field in info.value.message
    return info.value


def test_inside_paths_resolve_to_their_real_path(root: Path) -> None:
    assert resolve_read_path(str(root / "data" / "a.png"), [root], field="f") == (root / "data" / "a.png").resolve()
    assert resolve_read_path(str(root), [root], field="f") == root.resolve()
    # Missing files are the caller's business (E_NOT_FOUND there), not a policy violation.
    assert resolve_read_path(str(root / "missing.tif"), [root], field="f") == root.resolve() / "missing.tif"
    # `..` that stays inside is fine once normalised.
    assert resolve_read_path(str(root / "data" / ".." / "data"), [root], field="f") == (root / "data").resolve()


def test_any_of_several_roots(root: Path, outside: Path) -> None:
    assert resolve_read_path(str(outside / "secret.txt"), [root, outside], field="f").name == "secret.txt"


def test_dotdot_traversal_is_refused(root: Path, outside: Path) -> None:
    raw = str(root / "data" / ".." / ".." / "outside" / "secret.txt")
    error = _refused(raw, [root], "tiles[0].data")
    assert "outside the allowed folders" in error.message


def test_absolute_path_outside_is_refused(root: Path) -> None:
    _refused("/etc/passwd", [root])


def test_prefix_sibling_is_not_inside(tmp_path: Path, root: Path) -> None:
    # /x/root-evil starts with the characters of /x/root but is another folder.
    sibling = tmp_path / "root-evil"
    sibling.mkdir()
    _refused(str(sibling), [root])


def test_tilde_is_refused_not_expanded(root: Path) -> None:
    error = _refused("~/data", [Path.home(), root])
    assert "~" in error.message
    _refused("~root/x", [root])


def test_nul_byte_is_refused(root: Path) -> None:
    error = _refused(str(root / "a\x00b"), [root], "model_path")
    assert "NUL" in error.message


@pytest.mark.parametrize(
    "raw", ["\\\\server\\share\\x.tif", "C:\\data\\x.tif", "C:/data/x.tif", "c:", "//server/share/x.tif", "/a\\b"]
)
def test_windows_and_unc_forms_are_refused(root: Path, raw: str) -> None:
    error = _refused(raw, [Path("/")], "data_path")
    assert "Windows" in error.message


@pytest.mark.parametrize("raw", ["data/a.png", "./a.png", "", "file:///etc/passwd"])
def test_relative_paths_are_refused_with_a_hint(root: Path, raw: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(root)  # even where the relative path would land inside a root
    error = _refused(raw, [root])
    assert error.hint and "/" in error.hint


def test_non_text_and_overlong_paths(root: Path) -> None:
    _refused(None, [root])  # type: ignore[arg-type]
    _refused("/" + "a" * 5000, [Path("/")])


def test_symlink_inside_a_root_pointing_out_is_refused(root: Path, outside: Path) -> None:
    link = root / "data" / "innocent.tif"
    link.symlink_to(outside / "secret.txt")
    error = _refused(str(link), [root], "tiles[3].data")
    assert str(outside) not in error.message and "secret" not in error.message
    assert str(outside) not in (error.hint or "")


def test_symlinked_intermediate_folder_is_refused(root: Path, outside: Path) -> None:
    (root / "share").symlink_to(outside, target_is_directory=True)
    error = _refused(str(root / "share" / "secret.txt"), [root])
    assert str(outside) not in error.message
    # A link that stays inside a root is followed and allowed.
    (root / "alias").symlink_to(root / "data", target_is_directory=True)
    assert resolve_read_path(str(root / "alias" / "a.png"), [root], field="f") == (root / "data" / "a.png").resolve()


def test_root_given_through_a_symlink(tmp_path: Path, root: Path) -> None:
    link_root = tmp_path / "link-root"
    link_root.symlink_to(root, target_is_directory=True)
    assert resolve_read_path(str(root / "data" / "a.png"), [link_root], field="f").name == "a.png"
    assert resolve_read_path(str(link_root / "data" / "a.png"), [root], field="f").name == "a.png"


def test_no_roots_allows_nothing(root: Path) -> None:
    _refused(str(root), [])


def test_write_dir_may_not_exist_yet(root: Path) -> None:
    target = resolve_write_dir(str(root / "out" / "run1"), [root], field="output_dir")
    assert target == root.resolve() / "out" / "run1"
    assert not target.exists()


def test_write_dir_refusals(root: Path, outside: Path) -> None:
    error = _refused(str(root / "new" / ".." / ".." / "outside" / "x"), [root], "output_dir", write=True)
    assert "output_dir" in error.message
    (root / "escape").symlink_to(outside, target_is_directory=True)
    error = _refused(str(root / "escape" / "new" / "deeper"), [root], "output_dir", write=True)
    assert str(outside) not in error.message
    _refused("~/out", [root], "output_dir", write=True)
    _refused("out", [root], "output_dir", write=True)


def test_open_regular_file_reads_the_file(root: Path) -> None:
    fd = open_regular_file(root / "data" / "a.png")
    try:
        assert os.read(fd, 10) == b"x"
    finally:
        os.close(fd)


def test_open_regular_file_refuses_a_symlink(root: Path) -> None:
    link = root / "data" / "b.png"
    link.symlink_to(root / "data" / "a.png")  # even one pointing inside: the checked path must be the file
    with pytest.raises(DlwatchdError) as info:
        open_regular_file(link)
    assert info.value.code == ErrorCode.PATH_NOT_ALLOWED
    assert "b.png" in info.value.message


def test_a_file_link_swapped_back_right_after_the_open_still_counts_as_a_link(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the swap test in tests/e2e hit now and then: open() meets the link (ELOOP), the real file is back
    before anyone looks again; it is still a link on the way, not an unreadable file."""
    real = root / "data" / "a.png"
    parked = real.with_name(real.name + ".parked")
    real.rename(parked)
    real.symlink_to(parked)
    opened = os.open

    def open_then_swap_back(name: str, flags: int, *args: object, **kwargs: object) -> int:
        try:
            return opened(name, flags, *args, **kwargs)  # type: ignore[arg-type]
        except OSError:
            if real.is_symlink():
                real.unlink()
                parked.rename(real)
            raise

    monkeypatch.setattr(os, "open", open_then_swap_back)
    monkeypatch.setattr(os, "supports_dir_fd", os.supports_dir_fd | {open_then_swap_back})
    with pytest.raises(DlwatchdError) as info:
        open_regular_file(root / "data" / "a.png")
    assert info.value.code == ErrorCode.PATH_NOT_ALLOWED, info.value
    assert not real.is_symlink(), "the link was swapped back, as in the race"


def test_open_regular_file_refuses_non_files(root: Path) -> None:
    with pytest.raises(DlwatchdError) as info:
        open_regular_file(root / "data")
    assert info.value.code == ErrorCode.IMAGE_READ and "data" in info.value.message
    fifo = root / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(DlwatchdError) as info:  # must not block waiting for a writer
        open_regular_file(fifo)
    assert info.value.code == ErrorCode.IMAGE_READ and "pipe.png" in info.value.message


def test_open_regular_file_missing(root: Path) -> None:
    with pytest.raises(DlwatchdError) as info:
        open_regular_file(root / "gone.png")
    assert info.value.code == ErrorCode.NOT_FOUND and "gone.png" in info.value.message
