"""Training through the spool: a real model on synthetic sparse labels, its files, and its life cycle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import epoch_of, wait_for, wait_state
from PIL import Image

from dlwatchd.client import SpoolClient
from dlwatchd.synth import SynthSpec, write_dataset

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def dataset(spool: Path, name: str, **spec: int) -> Path:
    root = spool / "inputs" / name
    write_dataset(root, SynthSpec(**{"train": 6, "validation": 3, "size": 64, **spec}))
    return root


def train_request(data: Path, **training: object) -> dict:
    classes = json.loads((data / "config.json").read_text())["classes"]
    channels = 3
    first = next((data / "train" / "images").iterdir())
    if first.suffix == ".tif":
        import tifffile

        channels = tifffile.imread(first).shape[-1]
    return {
        "kind": "train",
        "model_type": "unet",
        "architecture": {"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False},
        "input_config": {"num_channels": channels, "bit_depth": 8},
        "classes": [c["name"] for c in classes],
        "training": {
            "epochs": 2,
            "batch_size": 3,
            "learning_rate": 0.003,
            "seed": 7,
            "scheduler": "none",
            "export_int8": False,  # the int8 export costs seconds; the complete-model test covers it
            **training,
        },
        "data_path": str(data),
    }


def test_a_training_publishes_a_complete_model(daemon, client: SpoolClient, spool: Path) -> None:
    data = dataset(spool, "basic")
    job = client.submit(train_request(data, export_int8=True))
    status = wait_state(client, job, TERMINAL, timeout=300)
    assert status.state.value == "succeeded", status.error
    result = status.result
    model_dir = Path(result["model_path"])
    assert model_dir.parent == spool / "models" and model_dir.name == result["model_id"]
    assert result["epochs_trained"] == 2 and 1 <= result["best_epoch"] <= 2
    assert set(result["per_class_iou"]) == {"Background", "Nucleus"}
    for name in (
        "model.pt",
        "model.onnx",
        "metadata.json",
        "preprocessing.json",
        "training_history.json",
        "training_report.png",
    ):
        assert (model_dir / name).exists(), name
    state = torch.load(model_dir / "model.pt", weights_only=True)
    assert any(key.startswith("encoder.") for key in state)
    metadata = json.loads((model_dir / "metadata.json").read_text())
    assert list(metadata)[:2] == ["id", "name"] and metadata["name"] == "UNET Classifier"
    assert metadata["architecture"]["type"] == "unet" and metadata["onnx"]["verified"] is True
    assert metadata["input_config"]["normalization"]["strategy"] == "percentile_99"
    assert metadata["training"]["final_loss"] == result["final_loss"]
    history = json.loads((model_dir / "training_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and "val_loss" in history[0]
    assert json.loads((client.layout.job_dir(job) / "history.json").read_text()) == history
    assert not (client.layout.job_dir(job) / "checkpoint.pt").exists()
    assert status.progress["epoch"] == 2
    int8 = metadata["onnx"]["int8"]
    assert int8["verified"] is True and (model_dir / "model.int8.onnx").exists(), int8
    assert int8["calibration_tiles"] == 9  # the 3 validation tiles, then the 6 training tiles
    tile = sorted((data / "validation" / "images").iterdir())[0]
    answers = {}
    for precision in ("fp32", "int8"):
        request = {"kind": "infer", "model_id": result["model_id"], "tiles": [{"id": "t", "data": str(tile)}]}
        request["options"] = {"precision": precision}
        answer = wait_state(client, client.submit(request), TERMINAL, 120)
        assert answer.state.value == "succeeded", answer.error
        assert (answer.result["runtime"], answer.result["precision"]) == ("onnx", precision)
        answers[precision] = answer.result["predictions"]["t"]
    assert answers["int8"] != answers["fp32"]
    assert np.allclose(answers["int8"], answers["fp32"], atol=0.1)
    log = client.layout.log_path(job).read_text()
    for epoch in (1, 2):
        assert f"epoch {epoch}/2: train loss " in log and "mean IoU" in log, log


def test_cancel_publishes_nothing(daemon, client: SpoolClient, spool: Path) -> None:
    data = dataset(spool, "cancel")
    job = client.submit(train_request(data, epochs=200))
    wait_for(lambda: epoch_of(client, job) >= 1, timeout=120)
    client.cancel(job)
    assert wait_state(client, job, TERMINAL, timeout=60).state.value == "cancelled"
    assert list((spool / "models").iterdir()) == []
    assert not (client.layout.job_dir(job) / "checkpoint.pt").exists()


def test_pause_resume_with_a_learning_rate_override_then_finish(daemon, client: SpoolClient, spool: Path) -> None:
    data = dataset(spool, "pause")
    job = client.submit(train_request(data, epochs=50))
    wait_for(lambda: epoch_of(client, job) >= 1, timeout=120)
    client.pause(job)
    paused = wait_state(client, job, {"paused"}, timeout=120)
    epochs_done = paused.progress["epoch"]
    assert (client.layout.job_dir(job) / "checkpoint.pt").exists()
    client.resume(job, {"learning_rate": 0.0005})
    wait_for(lambda: epoch_of(client, job) > epochs_done, timeout=120)
    client.finish(job)
    done = wait_state(client, job, TERMINAL, timeout=120)
    assert done.state.value == "succeeded" and done.result["stop_reason"] == "finished_early"
    history = json.loads((Path(done.result["model_path"]) / "training_history.json").read_text())
    assert history[epochs_done - 1]["learning_rate"] == pytest.approx(0.003)
    assert history[epochs_done]["learning_rate"] == pytest.approx(0.0005), "the override must really apply"
    assert len(history) < 50


def test_a_killed_daemon_resumes_the_training(make_daemon, client: SpoolClient, spool: Path) -> None:
    data = dataset(spool, "crash")
    daemon = make_daemon()
    job = client.submit(train_request(data, epochs=4))
    wait_for(lambda: (client.layout.job_dir(job) / "checkpoint.pt").exists(), timeout=120)
    daemon.kill()
    make_daemon()
    done = wait_state(client, job, TERMINAL, timeout=300)
    assert done.state.value == "succeeded", done.error
    assert done.result["epochs_trained"] == 4 and "resumed_after_restart" in done.notes


def test_five_channel_16_bit_tiff(daemon, client: SpoolClient, spool: Path) -> None:
    data = dataset(spool, "tiff", channels=5, bit_depth=16, classes=3)
    request = train_request(data, epochs=1)
    request["input_config"]["bit_depth"] = 16
    status = wait_state(client, client.submit(request), TERMINAL, timeout=300)
    assert status.state.value == "succeeded", status.error
    metadata = json.loads((Path(status.result["model_path"]) / "metadata.json").read_text())
    assert metadata["architecture"]["in_channels"] == 5 and len(metadata["normalization_stats"]) == 5


def _break(data: Path, how: str) -> None:
    masks = data / "train" / "masks"
    if how == "missing-mask":
        next(masks.iterdir()).unlink()
    elif how == "label-out-of-range":
        first = next(masks.iterdir())
        mask = np.array(Image.open(first))
        mask[0, 0] = 7
        Image.fromarray(mask).save(first)
    elif how == "empty-validation":
        shutil.rmtree(data / "validation" / "images")
        (data / "validation" / "images").mkdir()


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("missing-mask", "E_NOT_FOUND"),
        ("label-out-of-range", "E_MASK_LABELS"),
        ("empty-validation", "E_EMPTY_DATASET"),
        ("channels", "E_CHANNELS"),
        ("weights", "E_WEIGHTS_UNAVAILABLE"),
        ("outside", "E_PATH_NOT_ALLOWED"),
    ],
)
def test_training_errors_before_the_first_epoch(daemon, client: SpoolClient, spool: Path, how: str, code: str) -> None:
    data = dataset(spool, f"bad-{how}")
    _break(data, how)
    request = train_request(data)
    if how == "channels":
        request["input_config"]["num_channels"] = 4
    if how == "weights":
        request["architecture"]["use_pretrained"] = True
    if how == "outside":
        request["data_path"] = "/etc"
    status = wait_state(client, client.submit(request), TERMINAL, timeout=120)
    assert status.state.value == "failed" and status.error.code.value == code, status.error
    assert (status.progress or {}).get("epoch", 0) == 0
    assert list((spool / "models").iterdir()) == []
