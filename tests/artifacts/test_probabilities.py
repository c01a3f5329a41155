"""Probability maps: the exact `.bin` byte layout, atomic writes, safe file names, and the manifest."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from dlwatchd.artifacts.manifest import write_manifest
from dlwatchd.artifacts.probabilities import read_probabilities, safe_tile_filename, write_probabilities


def sample_map(channels: int = 3, height: int = 5, width: int = 7) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((channels, height, width), dtype=np.float32)


def test_bytes_are_little_endian_float32_in_c_order(tmp_path: Path) -> None:
    probabilities = sample_map()
    channels, height, width = probabilities.shape
    path = tmp_path / "tile.bin"
    entry = write_probabilities(path, probabilities)
    raw = path.read_bytes()
    assert len(raw) == 4 * channels * height * width
    for c in range(channels):
        for h in range(height):
            for w in range(width):
                (value,) = struct.unpack_from("<f", raw, 4 * (c * height * width + h * width + w))
                assert value == probabilities[c, h, w]
    assert entry == {
        "path": str(path),
        "bytes": len(raw),
        "dtype": "float32",
        "byte_order": "little",
        "shape": [channels, height, width],
        "sha256": hashlib.sha256(raw).hexdigest(),
    }
    assert [p.name for p in tmp_path.iterdir()] == ["tile.bin"]


def test_non_native_inputs_are_converted_and_sha256_can_be_off(tmp_path: Path) -> None:
    probabilities = sample_map().astype(">f8")[:, ::-1, :]  # big-endian float64, negative stride
    entry = write_probabilities(tmp_path / "t.bin", probabilities, sha256=False, durable=False)
    assert entry["sha256"] is None
    np.testing.assert_array_equal(read_probabilities(tmp_path / "t.bin", 3, 5, 7), probabilities.astype(np.float32))
    with pytest.raises(ValueError):
        write_probabilities(tmp_path / "flat.bin", np.zeros((4, 4), dtype=np.float32))


def test_read_round_trips_and_checks_the_size(tmp_path: Path) -> None:
    probabilities = sample_map(2, 4, 3)
    path = tmp_path / "x.bin"
    write_probabilities(path, probabilities)
    back = read_probabilities(path, 2, 4, 3)
    assert back.dtype == np.float32 and back.dtype.isnative
    np.testing.assert_array_equal(back, probabilities)
    for shape in [(2, 4, 4), (3, 4, 3), (0, 4, 3)]:
        with pytest.raises(ValueError):
            read_probabilities(path, *shape)


def test_a_failed_rename_leaves_no_temp_file_and_the_old_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tile.bin"
    write_probabilities(path, sample_map())
    before = path.read_bytes()

    def refuse(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError):
        write_probabilities(path, sample_map(3, 5, 7) + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["tile.bin"]
    assert path.read_bytes() == before


def test_safe_tile_filename() -> None:
    assert safe_tile_filename("tile_0001.x-y") == "tile_0001.x-y"
    assert safe_tile_filename("a" * 128) == "a" * 128
    ids = ["a/b", "a b", "a_b", "..", ".", "../../etc/passwd", "tümor", "tumor", "タイル", "", "a" * 129, "a\\b", "a:b"]
    names = [safe_tile_filename(tile_id) for tile_id in ids]
    assert len(set(names)) == len(ids)
    for tile_id, name in zip(ids, names, strict=True):
        assert "/" not in name and "\\" not in name and name not in ("", ".", "..")
        assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)
        assert len(name) <= 128 + 9
        if tile_id not in ("a_b", "tumor"):
            suffix = hashlib.sha1(tile_id.encode("utf-8")).hexdigest()[:8]
            assert name.endswith("_" + suffix)
    assert safe_tile_filename("a/b").startswith("a_b_")
    assert safe_tile_filename("..") != ".." and not safe_tile_filename("../x").startswith("../")
    assert safe_tile_filename("\ud800") != safe_tile_filename("\ud801")  # lone surrogates from JSON do not crash


def test_manifest_paths_are_relative_inside_the_base_and_absolute_outside(tmp_path: Path) -> None:
    job = tmp_path / "jobs" / "j1"
    (job / "out").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    entries = [
        write_probabilities(job / "out" / "a.bin", sample_map()),
        write_probabilities(outside / "b.bin", sample_map()),
    ]
    manifest = job / "manifest.json"
    write_manifest(manifest, entries, base=job)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    assert data["protocol"] == 1
    assert [entry["path"] for entry in data["outputs"]] == ["out/a.bin", str(outside / "b.bin")]
    assert data["outputs"][0]["sha256"] == entries[0]["sha256"]
    assert entries[0]["path"] == str(job / "out" / "a.bin")  # the caller's entries are untouched
    write_manifest(manifest, entries, base=None)
    paths = [entry["path"] for entry in json.loads(manifest.read_text(encoding="utf-8"))["outputs"]]
    assert all(Path(path).is_absolute() for path in paths)
    assert sorted(p.name for p in job.iterdir()) == ["manifest.json", "out"]
