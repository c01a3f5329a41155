"""Inference through the spool: class averages and .bin maps from a real model folder."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import wait_for, wait_state
from PIL import Image

from dlwatchd.artifacts.metadata import build_metadata, build_preprocessing
from dlwatchd.client import SpoolClient, read_probabilities
from dlwatchd.engine.models import create_model
from dlwatchd.engine.onnx_export import export_onnx

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def make_model_folder(folder: Path, in_channels: int = 3, classes: int = 3, onnx: bool = True) -> Path:
    torch.manual_seed(0)
    model = create_model("unet", "resnet18", in_channels, classes).eval()
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / "model.pt")
    if onnx:
        assert export_onnx(model, folder / "model.onnx", in_channels=in_channels, input_size=(64, 64))["verified"]
    metadata = build_metadata(
        model_id=folder.name,
        model_type="unet",
        architecture={"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False, "frozen_layers": None},
        input_config={
            "num_channels": in_channels,
            "channel_names": [f"c{i}" for i in range(in_channels)],
            "bit_depth": 8,
            "normalization": {"strategy": "percentile_99", "per_channel": True, "clip_percentile": 99.0,
                              "min": 0.0, "max": 255.0, "scope": "tile", "stats": None},
        },
        classes=[f"class{i}" for i in range(classes)],
        unlabeled_index=255,
        normalization_stats=[],
        training={},
        onnx={"verified": onnx},
        extra_architecture={"in_channels": in_channels, "num_classes": classes, "size_divisor": 32},
    )  # fmt: skip
    (folder / "metadata.json").write_text(json.dumps(metadata))
    (folder / "preprocessing.json").write_text(json.dumps(build_preprocessing(metadata)))
    return folder


@pytest.fixture(scope="module")
def model_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / "unet_test")


@pytest.fixture
def model(spool: Path, model_template: Path) -> str:
    shutil.copytree(model_template, spool / "models" / "unet_test")
    return "unet_test"


def tile_png(path: Path, height: int, width: int, seed: int = 0, channels: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels == 3:
        Image.fromarray(array, "RGB").save(path)
    else:
        tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig")
    return path


def test_infer_pixel_writes_exact_bin_maps(daemon, client: SpoolClient, spool: Path, model: str) -> None:
    inputs = spool / "inputs" / "px"
    tiles = [
        {"id": "a", "data": str(tile_png(inputs / "a.png", 64, 64, 1))},
        {"id": "odd-size", "data": str(tile_png(inputs / "b.png", 97, 70, 2))},
    ]
    status = wait_state(
        client, client.submit({"kind": "infer-pixel", "model_id": model, "tiles": tiles}), TERMINAL, 120
    )
    assert status.state.value == "succeeded", status.error
    result = status.result
    assert result["num_classes"] == 3 and result["shape"]["odd-size"] == [3, 97, 70]
    odd = Path(result["output_paths"]["odd-size"])
    assert odd.name == "odd-size.bin" and odd.stat().st_size == 4 * 3 * 97 * 70
    probabilities = read_probabilities(odd, 3, 97, 70)
    assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    manifest = json.loads((client.layout.job_dir(status.job_id) / "manifest.json").read_text())
    assert {entry["shape"][1] for entry in manifest["outputs"]} == {64, 97}
    assert all(len(entry["sha256"]) == 64 for entry in manifest["outputs"])


def test_infer_class_averages_and_data_urls(daemon, client: SpoolClient, spool: Path, model: str) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    status = wait_state(
        client, client.submit({"kind": "infer", "model_id": model, "tiles": [{"id": "t1", "data": url}]}), TERMINAL, 120
    )
    assert status.state.value == "succeeded", status.error
    averages = status.result["predictions"]["t1"]
    assert len(averages) == 3 and abs(sum(averages) - 1.0) < 1e-4


def test_bad_inputs_fail_with_codes_and_leave_no_partial_output(
    daemon, client: SpoolClient, spool: Path, model: str, tmp_path: Path
) -> None:
    inputs = spool / "inputs" / "bad"
    good = tile_png(inputs / "good.png", 64, 64)
    broken = inputs / "broken.png"
    broken.write_bytes(good.read_bytes()[:100])
    cases = {
        "missing-model": ({"model_id": "nope", "tiles": [{"id": "a", "data": str(good)}]}, "E_NOT_FOUND"),
        "model-outside": ({"model_path": "/etc", "tiles": [{"id": "a", "data": str(good)}]}, "E_PATH_NOT_ALLOWED"),
        "tile-outside": ({"model_id": model, "tiles": [{"id": "a", "data": "/etc/hostname"}]}, "E_PATH_NOT_ALLOWED"),
        "channels": (
            {"model_id": model, "input_config": {"num_channels": 4}, "tiles": [{"id": "a", "data": str(good)}]},
            "E_CHANNELS",
        ),
        "broken-tile": (
            {"model_id": model, "tiles": [{"id": "a", "data": str(good)}, {"id": "b", "data": str(broken)}]},
            "E_IMAGE_READ",
        ),
    }
    for name, (body, code) in cases.items():
        status = wait_state(client, client.submit({"kind": "infer-pixel", **body}, job_id=name), TERMINAL, 120)
        assert status.state.value == "failed" and status.error.code.value == code, (name, status.error)
        assert (
            not list((client.layout.job_dir(name) / "outputs").glob("*.bin"))
            if (client.layout.job_dir(name) / "outputs").exists()
            else True
        )


def test_output_dir_in_a_write_root(make_daemon, client: SpoolClient, spool: Path, model: str, tmp_path: Path) -> None:
    out = tmp_path / "project" / "overlays"
    make_daemon(env={"DLWATCHD_WRITE_ROOTS": str(tmp_path / "project")})
    tile = tile_png(spool / "inputs" / "o" / "t.png", 64, 64)
    request = {
        "kind": "infer-pixel",
        "model_id": model,
        "output_dir": str(out),
        "tiles": [{"id": "t", "data": str(tile)}],
    }
    status = wait_state(client, client.submit(request), TERMINAL, 120)
    assert status.state.value == "succeeded", status.error
    assert Path(status.result["output_paths"]["t"]) == out / "t.bin"
    refused = wait_state(client, client.submit({**request, "output_dir": str(tmp_path / "elsewhere")}), TERMINAL, 120)
    assert refused.error.code.value == "E_PATH_NOT_ALLOWED"


def test_requests_batched_together_give_the_same_numbers(daemon, client: SpoolClient, spool: Path, model: str) -> None:
    tiles = [tile_png(spool / "inputs" / "g" / f"{i}.png", 64, 64, seed=10 + i) for i in range(4)]

    def body(i: int) -> dict:
        return {"kind": "infer", "model_id": model, "tiles": [{"id": f"t{i}", "data": str(tiles[i])}]}

    alone = [wait_state(client, client.submit(body(i)), TERMINAL, 120).result["predictions"] for i in range(4)]
    blocker = client.submit({"kind": "test-sleep", "steps": 40, "step_s": 0.05})  # keeps the infer lane busy
    wait_state(client, blocker, {"running"})
    together_ids = [client.submit(body(i)) for i in range(4)]
    together = [wait_state(client, job, TERMINAL, 120) for job in together_ids]
    assert all(s.state.value == "succeeded" for s in together)
    for single, grouped in zip(alone, together, strict=True):
        ((tile_id, values),) = single.items()
        assert np.allclose(values, grouped.result["predictions"][tile_id], atol=1e-6)
    started = sorted(s.started_at for s in together)
    assert started[0] == started[-1] or len(set(s.daemon for s in together)) == 1


def test_cancel_mid_request(daemon, client: SpoolClient, spool: Path, model: str) -> None:
    tile = tile_png(spool / "inputs" / "c" / "t.png", 256, 256)
    job = client.submit({"kind": "infer-pixel", "model_id": model, "options": {"max_batch": 1},
                         "tiles": [{"id": f"t{i}", "data": str(tile)} for i in range(200)]})  # fmt: skip
    wait_for(lambda: client.status(job) and (client.status(job).progress or {}).get("tiles_done", 0) >= 2, timeout=120)
    client.cancel(job)
    status = wait_state(client, job, TERMINAL, 120)
    assert status.state.value == "cancelled"
    outputs = client.layout.job_dir(job) / "outputs"
    assert not outputs.exists() or not list(outputs.glob("*.bin"))


def test_five_channel_tiff_and_client_schema_metadata(daemon, client: SpoolClient, spool: Path, tmp_path: Path) -> None:
    folder = make_model_folder(spool / "models" / "five", in_channels=5, classes=2, onnx=False)
    (folder / "preprocessing.json").unlink()
    client_schema = {
        "name": "Five channel model",
        "architecture": {
            "type": "unet",
            "backbone": "resnet18",
            "input_channels": 5,
            "input_width": 64,
            "input_height": 64,
        },
        "classes": [{"index": 0, "name": "a", "color": "#000000"}, {"index": 1, "name": "b", "color": "#ffffff"}],
        "channel_config": {"normalization_strategy": "PERCENTILE_99", "expected_channels": ["1", "2", "3", "4", "5"]},
    }
    (folder / "metadata.json").write_text(json.dumps(client_schema))
    tile = tile_png(spool / "inputs" / "five" / "t.tif", 64, 64, channels=5)
    status = wait_state(
        client,
        client.submit({"kind": "infer", "model_id": "five", "tiles": [{"id": "t", "data": str(tile)}]}),
        TERMINAL,
        120,
    )
    assert status.state.value == "succeeded", status.error
    assert len(status.result["predictions"]["t"]) == 2 and status.result["runtime"] == "torch"
