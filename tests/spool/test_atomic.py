"""atomic.py: a reader sees the previous or the next complete file, never a partial one or none."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from dlwatchd.spool import atomic
from dlwatchd.spool.atomic import rename_claim, write_bytes_atomic, write_json_atomic


def leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name not in keep)


def test_write_json_atomic_publishes_the_object(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    write_json_atomic(target, {"a": 1, "text": "\u00e9"}, dir_sync=True)
    assert json.loads(target.read_bytes()) == {"a": 1, "text": "\u00e9"}
    assert "\u00e9".encode() in target.read_bytes()  # UTF-8, not \u escapes
    assert leftovers(tmp_path, {"status.json"}) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_number_is_refused_and_the_old_file_kept(tmp_path: Path, value: float) -> None:
    target = tmp_path / "status.json"
    write_json_atomic(target, {"seq": 1})
    with pytest.raises(ValueError):
        write_json_atomic(target, {"seq": 2, "loss": value})
    assert json.loads(target.read_bytes()) == {"seq": 1}
    assert leftovers(tmp_path, {"status.json"}) == []


def test_a_failing_replace_keeps_the_old_content_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "status.json"
    write_json_atomic(target, {"seq": 1})
    temps: list[Path] = []

    def full_disk(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        temps.append(Path(src))
        assert Path(src).exists()  # the new version was fully staged before the rename
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError) as info:
        write_json_atomic(target, {"seq": 2})
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert json.loads(target.read_bytes()) == {"seq": 1}
    assert len(temps) == 1 and temps[0].parent == tmp_path and temps[0].name.startswith(".")
    assert leftovers(tmp_path, {"status.json"}) == []


def test_a_failing_write_keeps_the_old_content_and_removes_the_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "status.json"
    write_json_atomic(target, {"seq": 1})

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError):
        write_json_atomic(target, {"seq": 2})
    monkeypatch.undo()
    assert json.loads(target.read_bytes()) == {"seq": 1}
    assert leftovers(tmp_path, {"status.json"}) == []


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", short_write)
    payload = bytes(range(256)) * 40
    write_bytes_atomic(tmp_path / "out.bin", payload)
    monkeypatch.undo()
    assert (tmp_path / "out.bin").read_bytes() == payload


def test_the_temp_name_is_a_hidden_sibling(tmp_path: Path) -> None:
    temp = atomic.temp_sibling(tmp_path / "status.json")
    assert temp.parent == tmp_path
    assert temp.name.startswith(".status.json.") and temp.name.endswith(".tmp")
    assert temp != atomic.temp_sibling(tmp_path / "status.json")


# --- rename_claim ----------------------------------------------------------------------------


def test_rename_claim_moves_the_file_and_wins(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.json", tmp_path / "b.json"
    src.write_text("{}")
    assert rename_claim(src, dst) is True
    assert not src.exists() and dst.read_text() == "{}"


def test_rename_claim_loses_when_the_source_is_gone(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.json", tmp_path / "b.json"
    src.write_text("{}")
    os.rename(src, tmp_path / "someone-else.json")
    assert rename_claim(src, dst) is False
    assert not dst.exists()


def test_rename_claim_wins_for_a_dangling_symlink(tmp_path: Path) -> None:
    src, dst = tmp_path / "a.json", tmp_path / "b.json"
    os.symlink(tmp_path / "nowhere", src)
    won = rename_claim(src, dst)
    assert dst.is_symlink() and not src.is_symlink()  # the move happened either way
    assert won is True


# --- concurrent readers ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_reader_never_sees_a_partial_or_missing_file(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    pad = "x" * 20_000  # several pages, so a torn write would show
    write_json_atomic(target, {"seq": 0, "pad": pad})
    start = threading.Barrier(2)
    problems: list[str] = []
    seen: set[int] = set()

    def writer() -> None:
        start.wait()
        for seq in range(1, 301):
            write_json_atomic(target, {"seq": seq, "pad": pad})

    def reader() -> None:
        start.wait()
        for _ in range(2000):
            try:
                data = json.loads(target.read_bytes())
            except FileNotFoundError:
                problems.append("missing")
                continue
            except ValueError as exc:
                problems.append(f"invalid: {exc}")
                continue
            if data["pad"] != pad:
                problems.append("wrong content")
            seen.add(data["seq"])

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert json.loads(target.read_bytes())["seq"] == 300
    assert leftovers(tmp_path, {"status.json"}) == []
    assert len(seen) > 1  # the reader really overlapped with the writer
