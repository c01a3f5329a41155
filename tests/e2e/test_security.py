"""Hostile requests against a real daemon: no read or write outside the roots, no code run, no hang.

One daemon serves the whole module. It runs with the `dlwatchd_audit` plugin, whose audit hook logs every
file open of every daemon process outside the allowed folders, and the test process watches a "secret"
folder outside the roots with inotify, which also sees opens made by native code (ONNX Runtime, libtiff).
Each case checks the stable error code, that nothing half-written is visible, and that the daemon still
answers a `health` request.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import pickle
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch
from conftest import REPO, Daemon, wait_filed, wait_for, wait_state
from PIL import Image
from test_infer_e2e import make_model_folder, tile_png

from dlwatchd.client import SpoolClient
from dlwatchd.synth import SynthSpec, write_dataset

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}
SECRET = "secret-q7x"  # a name no legitimate path in these tests contains
REFUSED = {"E_PATH_NOT_ALLOWED", "E_SCHEMA"}
MODEL = "unet_sec"


# ---- helpers ----------------------------------------------------------------------------------------


def visible_outputs(job_dir: Path) -> list[str]:
    """What a client would find in the job's outputs/ folder (a failed request may never have made it)."""
    outputs = job_dir / "outputs"
    return sorted(os.listdir(outputs)) if outputs.exists() else []


class OpenWatch:
    """inotify on every folder of a tree: anything opened, read, written, created or moved in, by any process."""

    # IN_ACCESS | IN_MODIFY | IN_OPEN | IN_MOVED_TO | IN_CREATE | IN_DELETE
    MASK = 0x1 | 0x2 | 0x20 | 0x80 | 0x100 | 0x200

    def __init__(self, root: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, "inotify is not available"
        folders = [root, *(Path(d) / n for d, names, _ in os.walk(root) for n in names)]
        self.folders: dict[int, str] = {}
        for folder in folders:
            wd = libc.inotify_add_watch(self.fd, os.fsencode(folder), self.MASK)
            assert wd >= 0, f"cannot watch {folder}"
            self.folders[wd] = str(folder)
        self.events()  # drop what setting up the watches caused

    def events(self) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode(errors="replace")
                seen.append(os.path.join(self.folders.get(wd, "?"), name))
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def tree_paths(root: Path) -> list[str]:
    return [os.path.join(folder, name) for folder, names, files in os.walk(root) for name in names + files]


def tree_snapshot(paths: list[str]) -> dict[str, tuple[int, int, int]]:
    """(size, mtime_ns, inode) of each path, read with lstat only: listing folders would show up in inotify."""
    snapshot = {}
    for path in paths:
        info = os.lstat(path)
        snapshot[path] = (info.st_size, info.st_mtime_ns, info.st_ino)
    return snapshot


def publish_raw(spool: Path, job_id: str, data: bytes) -> None:
    temp = spool / "incoming" / f".{job_id}.json.tmp"
    temp.write_bytes(data)
    os.rename(temp, spool / "incoming" / f"{job_id}.json")


def assert_healthy(client: SpoolClient, timeout: float = 20) -> None:
    job = client.submit({"kind": "health"})
    status = wait_state(client, job, TERMINAL, timeout=timeout)
    assert status.state.value == "succeeded", status.error
    assert status.result["state"] == "ready", status.result.get("reason")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width × height RGB pixels, with almost no pixel data behind it."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def tiff_header_only(width: int, height: int) -> bytes:
    """A baseline TIFF whose tags claim width × height 8-bit pixels in one 16-byte strip."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 4, height), (279, 4, 16)]  # fmt: skip
    ifd_size = 2 + 12 * len(entries) + 4
    entries[5] = (273, 4, 8 + ifd_size)
    ifd = struct.pack("<H", len(entries))
    ifd += b"".join(struct.pack("<HHII", tag, kind, 1, value) for tag, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + b"\0" * 16


class Bomb:
    """Unpickling it creates a marker file: what a hostile model.pt would do instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def vm_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


# ---- the module's daemon and its surroundings ---------------------------------------------------------


@dataclass
class World:
    base: Path
    spool: Path
    read_root: Path
    write_root: Path
    secret: Path
    audit_log: Path
    client: SpoolClient
    daemon: Daemon
    watch: OpenWatch
    secret_paths: list[str] = field(default_factory=list)
    snapshot: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def run(self, request: dict[str, Any], timeout: float = 120) -> Any:
        return wait_state(self.client, self.client.submit(request), TERMINAL, timeout=timeout)

    def infer(self, tiles: list[str], kind: str = "infer-pixel", **fields: Any) -> dict[str, Any]:
        request = {"kind": kind, "tiles": [{"id": f"t{i}", "data": data} for i, data in enumerate(tiles)], **fields}
        if "model_path" not in fields:
            request["model_id"] = MODEL
        return request

    def worker_pid(self, lane: str) -> int:
        return self.daemon.worker_pids()[lane]


def _train_request(data_path: str) -> dict[str, Any]:
    return {
        "kind": "train",
        "model_type": "unet",
        "architecture": {"backbone": "resnet18", "input_size": [32, 32], "use_pretrained": False},
        "input_config": {"num_channels": 3, "bit_depth": 8},
        "classes": ["Background", "Nucleus"],
        "training": {"epochs": 1, "batch_size": 2, "seed": 1, "scheduler": "none", "export_int8": False},
        "data_path": data_path,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("security")
    spool, read_root, write_root, secret = base / "spool", base / "readroot", base / "writeroot", base / SECRET
    for folder in (spool, read_root, write_root, secret / "out"):
        folder.mkdir(parents=True)
    template = make_model_folder(base / "template" / MODEL)
    import shutil

    shutil.copytree(template, spool / "models" / MODEL)
    shutil.copytree(template, secret / "model")
    tile_png(secret / "t.png", 64, 64, seed=1)
    write_dataset(secret / "data", SynthSpec(train=2, validation=1, size=32, classes=2))
    (secret / "req.json").write_text(json.dumps({"kind": "health"}))
    # Links inside the roots that lead out of them, one per field.
    tile_png(read_root / "good.png", 64, 64, seed=2)
    (read_root / "link_t.png").symlink_to(secret / "t.png")
    (read_root / "link_model").symlink_to(secret / "model")
    (read_root / "link_data").symlink_to(secret / "data")
    (read_root / "link_dir").symlink_to(secret)
    (write_root / "link_out").symlink_to(secret / "out")
    (write_root / "link_dir").symlink_to(secret)
    # A real model folder whose files are links out; a model id in the shared spool linked out.
    linked = read_root / "linked_files_model"
    linked.mkdir()
    for name in ("model.pt", "model.onnx", "metadata.json", "preprocessing.json"):
        (linked / name).symlink_to(secret / "model" / name)
    (spool / "models" / "evil").symlink_to(secret / "model")

    audit_log = spool / "audit.log"
    allowed = [spool, read_root, write_root, REPO, sys.prefix, sys.base_prefix, sys.exec_prefix,
               "/usr", "/lib", "/lib64", "/proc", "/sys", "/dev", "/etc", "/run"]  # fmt: skip
    secret_paths = tree_paths(secret)
    watch = OpenWatch(secret)
    daemon = Daemon(
        spool,
        "sec-1",
        DLWATCHD_PLUGINS="dlwatchd_testkinds,dlwatchd_audit",
        DLWATCHD_READ_ROOTS=str(read_root),
        DLWATCHD_WRITE_ROOTS=str(write_root),
        DLWATCHD_TEST_AUDIT_LOG=str(audit_log),
        DLWATCHD_TEST_AUDIT_ALLOW=os.pathsep.join(str(p) for p in allowed),
        XDG_DATA_HOME=str(base / "xdg"),
    ).start()
    instance = World(base, spool, read_root, write_root, secret, audit_log, SpoolClient(spool), daemon, watch)
    instance.secret_paths = secret_paths
    instance.snapshot = tree_snapshot(secret_paths)
    # Warm the infer lane once (torch import, model load) so later timings and memory figures are steady.
    warm = instance.run(instance.infer([str(read_root / "good.png")]))
    assert warm.state.value == "succeeded", warm.error
    yield instance
    daemon.stop()
    watch.close()


def assert_secret_untouched(world: World) -> None:
    opened = world.watch.events()
    assert opened == [], f"files outside the roots were opened: {sorted(set(opened))[:10]}"
    assert tree_snapshot(world.secret_paths) == world.snapshot, "something outside the roots changed"


# ---- paths --------------------------------------------------------------------------------------------

FORMS = {
    "dotdot": lambda root, name: f"{root}/../{SECRET}/{name}",
    "absolute-outside": lambda root, name: f"{root.parent / SECRET}/{name}",
    "tilde": lambda root, name: f"~/../..{root.parent / SECRET}/{name}",
    "nul-byte": lambda root, name: f"{root}/good.png\x00/../../{SECRET}/{name}",
    "unc-backslashes": lambda root, name: f"\\\\fileserver\\share\\{SECRET}\\{name}",
    "unc-slashes": lambda root, name: f"//fileserver/share/{SECRET}/{name}",
    "windows-drive": lambda root, name: f"C:\\{SECRET}\\{name}",
    "relative": lambda root, name: f"../{SECRET}/{name}",
    "symlink-out": lambda root, name: f"{root}/link_{name}",
    "symlinked-folder": lambda root, name: f"{root}/link_dir/{name}",
}
FIELDS = ("tile", "model_path", "output_dir", "data_path")


def hostile_request(world: World, field_name: str, form: str) -> dict[str, Any]:
    build = FORMS[form]
    good = str(world.read_root / "good.png")
    if field_name == "tile":
        return world.infer([good, build(world.read_root, "t.png")])
    if field_name == "model_path":
        return world.infer([good], kind="infer", model_path=build(world.read_root, "model"))
    if field_name == "output_dir":
        return world.infer([good], output_dir=build(world.write_root, "out"))
    return _train_request(build(world.read_root, "data"))


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("field_name", FIELDS)
def test_hostile_paths_are_refused(world: World, field_name: str, form: str) -> None:
    status = world.run(hostile_request(world, field_name, form))
    assert status.state.value in ("failed", "rejected"), status.state
    assert status.error.code.value == "E_PATH_NOT_ALLOWED", status.error
    assert status.error.code.value in REFUSED
    outputs = world.client.layout.job_dir(status.job_id) / "outputs"
    assert not outputs.exists() or os.listdir(outputs) == []
    assert sorted(os.listdir(world.spool / "models")) == sorted([MODEL, "evil"]), "a training published a model"
    assert_secret_untouched(world)
    assert_healthy(world.client)


@pytest.mark.parametrize(
    "how", ["model-files-linked-out", "model-id-linked-out", "bare-id-linked-out", "model-file-through-link"]
)
def test_model_folders_that_lead_out_are_refused(world: World, how: str) -> None:
    fields = {
        "model-files-linked-out": {"model_path": str(world.read_root / "linked_files_model")},
        "model-id-linked-out": {"model_id": "evil"},  # models/evil in the shared spool links out
        "bare-id-linked-out": {"model_path": "evil"},  # a bare id in model_path is resolved in models/ too
        "model-file-through-link": {"model_path": str(world.read_root / "link_model" / "model.pt")},
    }[how]
    request = {"kind": "infer", "tiles": [{"id": "a", "data": str(world.read_root / "good.png")}], **fields}
    status = world.run(request)
    assert status.state.value == "failed" and status.error.code.value == "E_PATH_NOT_ALLOWED", status.error
    assert_secret_untouched(world)
    assert_healthy(world.client)


def test_paths_swapped_for_links_between_check_and_open(world: World) -> None:
    """A folder and a file flip between the real thing and a link out while tiles are read: never followed."""
    folder, file = world.read_root / "swap", world.read_root / "swap.png"
    folder.mkdir()
    tile_png(folder / "t.png", 64, 64, seed=3)
    tile_png(file, 64, 64, seed=3)
    stop = threading.Event()
    flips = [0]

    def flip() -> None:
        parked_folder, parked_file = world.read_root / "swap.parked", world.read_root / "swap.png.parked"
        while not stop.is_set():
            os.rename(folder, parked_folder)
            os.symlink(world.secret, folder)
            os.rename(file, parked_file)
            os.symlink(world.secret / "t.png", file)
            os.unlink(folder)
            os.rename(parked_folder, folder)
            os.unlink(file)
            os.rename(parked_file, file)
            flips[0] += 1

    tiles = [str(folder / "t.png"), str(file)] * 100
    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    try:
        jobs = [world.client.submit(world.infer(tiles, kind="infer")) for _ in range(12)]
        statuses = [wait_state(world.client, job, TERMINAL, timeout=120) for job in jobs]
    finally:
        stop.set()
        flipper.join(10)
    assert flips[0] > 100
    for status in statuses:
        if status.state.value == "failed":
            assert status.error.code.value in ("E_PATH_NOT_ALLOWED", "E_NOT_FOUND"), status.error
        else:
            assert status.state.value == "succeeded"
    assert_secret_untouched(world)
    assert_healthy(world.client)


def test_audit_hook_saw_no_open_outside_the_roots(world: World) -> None:
    """Every hostile request once more, then the audit log of every daemon process is read."""
    jobs = [world.client.submit(hostile_request(world, f, form)) for f in FIELDS for form in FORMS]
    for job in jobs:
        assert wait_state(world.client, job, TERMINAL, timeout=120).error.code.value == "E_PATH_NOT_ALLOWED"
    lines = [line.split("\t", 1) for line in world.audit_log.read_text().splitlines()]
    installed = {pid for pid, what in lines if what.startswith("installed ")}
    lanes = set(world.daemon.heartbeat()["lanes"])
    assert len(installed) >= 1 + len(lanes), "the audit hook must run in the supervisor and in every worker"
    opened = sorted({what for _, what in lines if not what.startswith("installed ")})
    print(f"opens outside the allowed folders ({len(opened)}):", *opened[:40], sep="\n  ")
    assert not [path for path in opened if SECRET in path], "a daemon process opened a file outside the roots"
    assert_secret_untouched(world)


# ---- models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_model_pt_that_runs_code_when_unpickled_is_refused(world: World, layout: str) -> None:
    marker = world.base / f"pwned-{layout}"
    folder = world.read_root / f"bomb-{layout}"
    folder.mkdir()
    (folder / "metadata.json").write_bytes((world.spool / "models" / MODEL / "metadata.json").read_bytes())
    state = {"encoder.conv1.weight": torch.zeros(1), "bomb": Bomb(marker)}
    if layout == "zip":
        torch.save(state, folder / "model.pt")
    else:
        (folder / "model.pt").write_bytes(pickle.dumps(state, protocol=2))
    status = world.run(world.infer([str(world.read_root / "good.png")], kind="infer", model_path=str(folder)))
    assert status.state.value == "failed" and status.error.code.value == "E_UNSAFE_MODEL", status.error
    assert not marker.exists(), "unpickling model.pt ran code"
    assert_healthy(world.client)


@pytest.mark.parametrize("with_weights", [False, True])
def test_an_onnx_file_that_is_not_onnx(world: World, with_weights: bool) -> None:
    folder = world.read_root / f"fake-onnx-{with_weights}"
    folder.mkdir()
    source = world.spool / "models" / MODEL
    for name in ("metadata.json", "preprocessing.json") + (("model.pt",) if with_weights else ()):
        (folder / name).write_bytes((source / name).read_bytes())
    (folder / "model.onnx").write_bytes(b"PK\x03\x04 this is a zip, not a protobuf" + os.urandom(512))
    status = world.run(world.infer([str(world.read_root / "good.png")], kind="infer", model_path=str(folder)))
    if with_weights:
        assert status.state.value == "succeeded", status.error
        assert status.result["runtime"] == "torch"
        assert any("ONNX Runtime could not load" in w.message for w in status.warnings)
    else:
        assert status.state.value == "failed" and status.error.code.value == "E_NOT_FOUND", status.error
        assert "model.onnx" in status.error.message
    assert_healthy(world.client)


# ---- request files that are not regular files ---------------------------------------------------------


@pytest.mark.parametrize("what", ["hard-link", "fifo", "directory", "socket", "symlink"])
def test_request_names_that_are_not_regular_files(world: World, what: str) -> None:
    job_id = f"odd-{what}"
    target = world.spool / "incoming" / f"{job_id}.json"
    holder = None
    if what == "hard-link":
        os.link(world.secret / "req.json", target)
    elif what == "fifo":
        os.mkfifo(target)
    elif what == "directory":
        built = world.spool / "incoming" / f".{job_id}.building"  # published by rename, as a client would
        built.mkdir()
        (built / "inner.json").write_text("{}")
        built.rename(target)
    elif what == "socket":
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(str(target))
    else:
        target.symlink_to(world.secret / "req.json")
    started = time.monotonic()
    try:
        status = wait_state(world.client, job_id, TERMINAL, timeout=10)
    finally:
        if holder is not None:
            holder.close()
    assert time.monotonic() - started < 5, "the daemon blocked on a request that is not a regular file"
    assert status.state.value == "rejected" and status.error.code.value == "E_SCHEMA", status.error
    wait_filed(world.spool, job_id, "rejected")  # the move follows the status
    assert not os.path.lexists(target)
    assert not (world.spool / "queued" / f"{job_id}.json").exists()
    assert_secret_untouched(world)
    assert_healthy(world.client)


# ---- JSON ---------------------------------------------------------------------------------------------

DEEP = 100_000
JSON_CASES: dict[str, tuple[bytes, str, str | None]] = {
    # name: (request bytes, expected state, expected code)
    "ten-megabytes": (
        json.dumps({"kind": "health", "meta": {f"k{i}": "x" * 1_000_000 for i in range(10)}}).encode(),
        "succeeded",
        None,
    ),
    "depth-100000-objects": (
        b'{"kind": "health", "meta": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
        "rejected",
        "E_TOO_LARGE",
    ),
    "million-element-array": (
        b'{"kind": "health", "meta": {"a": [' + b",".join([b"0"] * 1_000_000) + b"]}}",
        "succeeded",
        None,
    ),
    "million-tiles": (
        b'{"kind": "infer", "model_id": "m", "tiles": [' + b",".join([b'{"id":"a","data":"b"}'] * 1_000_000) + b"]}",
        "rejected",
        "E_SCHEMA",
    ),
    "integer-of-100000-digits": (
        b'{"kind": "health", "meta": {"n": 1' + b"0" * 100_000 + b"}}",
        "rejected",
        "E_BAD_JSON",
    ),
    "float-of-100000-digits": (
        b'{"kind": "health", "meta": {"n": 1' + b"0" * 100_000 + b".5}}",
        "rejected",
        "E_SCHEMA",
    ),
    "exponent-overflow": (b'{"kind": "health", "meta": {"n": 1e400}}', "rejected", "E_SCHEMA"),
    "nan": (b'{"kind": "health", "meta": {"n": NaN}}', "rejected", "E_BAD_JSON"),
    "infinity": (b'{"kind": "health", "meta": {"n": Infinity}}', "rejected", "E_BAD_JSON"),
    "minus-infinity": (b'{"kind": "health", "meta": {"n": -Infinity}}', "rejected", "E_BAD_JSON"),
    "duplicate-keys": (b'{"kind": "health", "kind": "gpu"}', "rejected", "E_BAD_JSON"),
    "invalid-utf8": (b'{"kind": "health", "meta": {"x": "\xff\xfe\xc3"}}', "rejected", "E_BAD_JSON"),
    "lone-surrogate": (b'{"kind": "health", "meta": {"x": "\\ud800"}}', "rejected", "E_BAD_JSON"),
    "utf16": ('{"kind": "health"}'.encode("utf-16"), "rejected", "E_BAD_JSON"),
    "bom": (b'\xef\xbb\xbf{"kind": "health"}', "succeeded", None),
    "empty": (b"", "rejected", "E_BAD_JSON"),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_hostile_json(world: World, case: str) -> None:
    data, state, code = JSON_CASES[case]
    job_id = f"json-{case}"
    started = time.monotonic()
    publish_raw(world.spool, job_id, data)
    status = wait_state(world.client, job_id, TERMINAL, timeout=60)
    print(f"{case}: {len(data)} bytes, {status.state.value} {status.error.code.value if status.error else ''}"
          f" in {time.monotonic() - started:.2f} s")  # fmt: skip
    assert status.state.value == state, status.error
    if code is None:
        assert status.error is None
    else:
        assert status.error.code.value == code, status.error
        wait_filed(world.spool, job_id, "rejected", timeout=5)
    assert_healthy(world.client)


# ---- images -------------------------------------------------------------------------------------------


def test_image_headers_claiming_huge_sizes_are_refused_with_flat_memory(world: World) -> None:
    folder = world.read_root / "huge"
    folder.mkdir()
    (folder / "huge.tif").write_bytes(tiff_header_only(100_000, 100_000))
    (folder / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    import base64

    inline = "data:image/png;base64," + base64.b64encode(png_header_only(100_000, 100_000)).decode()
    pid = world.worker_pid("infer")
    before = vm_status(pid)
    for tile in (str(folder / "huge.tif"), str(folder / "huge.png"), inline):
        status = world.run(world.infer([str(world.read_root / "good.png"), tile]))
        assert status.state.value == "failed" and status.error.code.value == "E_IMAGE_TOO_LARGE", status.error
        assert "100000" in status.error.message
        assert visible_outputs(world.client.layout.job_dir(status.job_id)) == []
    after = vm_status(pid)
    assert world.worker_pid("infer") == pid, "the infer worker was replaced"
    print(f"infer worker {pid}: VmRSS {before['VmRSS']} -> {after['VmRSS']} KiB, "
          f"VmHWM {before['VmHWM']} -> {after['VmHWM']} KiB")  # fmt: skip
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, "decoding began: the peak memory grew"
    assert after["VmRSS"] - before["VmRSS"] < 64 * 1024
    assert_healthy(world.client)


def _image_bytes(fmt: str) -> bytes:
    array = np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    if fmt == "tiff":
        tifffile.imwrite(buffer, array, photometric="rgb")
    else:
        Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


def _unknown_compression_tiff(path: Path) -> None:
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(50000)


IMAGE_CASES = {
    # file name: (how to make its bytes, expected state, expected code)
    "truncated.png": (lambda p: p.write_bytes(_image_bytes("PNG")[:300]), "failed", "E_IMAGE_READ"),
    "truncated.tif": (lambda p: p.write_bytes(_image_bytes("tiff")[:2000]), "failed", "E_IMAGE_READ"),
    "truncated-header.tif": (lambda p: p.write_bytes(_image_bytes("tiff")[:10]), "failed", "E_IMAGE_READ"),
    "truncated.jpg": (lambda p: p.write_bytes(_image_bytes("JPEG")[:400]), "failed", "E_IMAGE_READ"),
    "empty.png": (lambda p: p.write_bytes(b""), "failed", "E_IMAGE_READ"),
    "text.png": (lambda p: p.write_text("not an image at all\n"), "failed", "E_IMAGE_READ"),
    "png-named.tif": (lambda p: p.write_bytes(_image_bytes("PNG")), "succeeded", None),
    "tiff-named.png": (lambda p: p.write_bytes(_image_bytes("tiff")), "succeeded", None),
    "unknown-compression.tif": (_unknown_compression_tiff, "failed", "E_IMAGE_READ"),
    "lzw.tif": (
        lambda p: Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(p, compression="tiff_lzw"),
        "succeeded",
        None,
    ),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_damaged_and_disguised_images(world: World, name: str) -> None:
    make, state, code = IMAGE_CASES[name]
    path = world.read_root / "images" / name
    path.parent.mkdir(exist_ok=True)
    make(path)
    status = world.run(world.infer([str(world.read_root / "good.png"), str(path)]))
    assert status.state.value == state, status.error
    outputs = world.client.layout.job_dir(status.job_id) / "outputs"
    if code is None:
        assert sorted(os.listdir(outputs)) == ["t0.bin", "t1.bin"]
    else:
        assert status.error.code.value == code, status.error
        assert visible_outputs(outputs.parent) == [], "a failed request left outputs behind"
        assert "imagecodecs" not in status.error.message and "module" not in status.error.message, status.error
    assert_healthy(world.client)


# ---- a spool folder swapped for a symlink ---------------------------------------------------------------


@pytest.mark.parametrize("target", ["inside-spool", "outside"])
def test_a_spool_folder_replaced_by_a_symlink_degrades_then_recovers(
    make_daemon, client: SpoolClient, spool: Path, tmp_path: Path, target: str
) -> None:
    daemon = make_daemon()
    queued = spool / "queued"
    parked = spool / "queued.parked" if target == "inside-spool" else tmp_path / "elsewhere"
    os.rename(queued, parked)
    queued.symlink_to(parked)
    beat = wait_for(lambda: (b := daemon.heartbeat()) and b["state"] == "degraded" and b, timeout=10)
    assert "queued" in (beat.get("reason") or ""), beat
    job = client.submit({"kind": "test-sleep"})
    time.sleep(2.0)  # four rescans
    assert client.status(job) is None, "a request was accepted into a spool with a folder swapped out"
    assert (spool / "incoming" / f"{job}.json").exists()
    assert os.listdir(parked) == []
    queued.unlink()
    os.rename(parked, queued)
    wait_for(lambda: (daemon.heartbeat() or {}).get("state") == "ready", timeout=10)
    assert wait_state(client, job, TERMINAL, timeout=20).state.value == "succeeded"
    assert_healthy(client)
