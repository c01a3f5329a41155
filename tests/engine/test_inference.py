"""Inference on real tiny model folders: both runtimes, padding, TTA, bf16, unsafe files, the cache, normalization."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlwatchd.artifacts.metadata import build_metadata, build_preprocessing, read_model_info
from dlwatchd.engine.inference import class_averages, predict_probabilities, resolve_normalization
from dlwatchd.engine.loading import LoadedModel, load_model
from dlwatchd.engine.model_cache import ModelCache
from dlwatchd.engine.models import create_model
from dlwatchd.engine.onnx_export import export_onnx
from dlwatchd.engine.tiles import pad_to_multiple
from dlwatchd.errors import DlwatchdError, ErrorCode

SIZES = [(64, 64), (97, 70), (96, 96)]
STORED_NORMALIZATION = {
    "strategy": "percentile_99",
    "per_channel": False,
    "clip_percentile": 99.5,
    "min": 0.0,
    "max": 255.0,
    "scope": "tile",
    "stats": None,
}


def make_model_folder(
    folder: Path,
    in_channels: int,
    num_classes: int,
    *,
    onnx: bool,
    metadata_channels: int | None = None,
    seed: int = 0,
) -> Path:
    """A model folder as training publishes it: seeded weights, model.pt, optional model.onnx, both metadata files."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = create_model("unet", "resnet18", in_channels, num_classes).eval()
    torch.save(model.state_dict(), folder / "model.pt")
    report: dict[str, Any] = {"opset": 17, "verified": False, "error": "not exported"}
    if onnx:
        report = export_onnx(model, folder / "model.onnx", in_channels=in_channels, input_size=(64, 64))
        assert report["verified"], report
    channels = in_channels if metadata_channels is None else metadata_channels
    metadata = build_metadata(
        model_id=folder.name,
        model_type="unet",
        architecture={"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False, "frozen_layers": None},
        input_config={
            "num_channels": channels,
            "channel_names": [f"c{index}" for index in range(channels)],
            "bit_depth": 8,
            "normalization": STORED_NORMALIZATION,
            "selected_channels": list(range(channels)),
        },
        classes=[f"class{index}" for index in range(num_classes)],
        unlabeled_index=255,
        normalization_stats=[],
        training={"epochs": 1},
        onnx=report,
        extra_architecture={
            "encoder_base": "resnet18",
            "encoder_weights": None,
            "in_channels": channels,
            "num_classes": num_classes,
            "size_divisor": 32,
            "frozen_layers_applied": [],
        },
    )
    (folder / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    (folder / "preprocessing.json").write_text(json.dumps(build_preprocessing(metadata)), encoding="utf-8")
    return folder


def without_onnx(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    (target / "model.onnx").unlink()
    return target


def random_tiles(in_channels: int, sizes: list[tuple[int, int]], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((in_channels, height, width), dtype=np.float32) for height, width in sizes]


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / "rgb", 3, 3, onnx=True)


@pytest.fixture(scope="module")
def rgb_torch_folder(rgb_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return without_onnx(rgb_folder, tmp_path_factory.mktemp("models") / "rgb_torch")


@pytest.fixture(scope="module")
def onnx_model(rgb_folder: Path) -> LoadedModel:
    return load_model(rgb_folder, use_gpu=False)


@pytest.fixture(scope="module")
def torch_model(rgb_torch_folder: Path) -> LoadedModel:
    return load_model(rgb_torch_folder, use_gpu=False)


def direct_probabilities(folder: Path, image: np.ndarray) -> np.ndarray:
    """The reference answer: a freshly built module, padded by hand, softmax by torch, cropped."""
    state = torch.load(folder / "model.pt", weights_only=True)
    model = create_model("unet", "resnet18", image.shape[0], state["segmentation_head.0.weight"].shape[0])
    model.load_state_dict(state)
    model.eval()
    padded, _ = pad_to_multiple(torch.from_numpy(image), None, 32, 0)
    with torch.no_grad():
        probabilities = torch.softmax(model(padded.unsqueeze(0)), dim=1)[0]
    return probabilities[:, : image.shape[1], : image.shape[2]].numpy()


def test_runtimes_are_selected_as_specified(onnx_model: LoadedModel, torch_model: LoadedModel) -> None:
    assert (onnx_model.runtime, onnx_model.providers, onnx_model.device) == ("onnx", ["CPUExecutionProvider"], "cpu")
    assert (torch_model.runtime, torch_model.providers, torch_model.device) == ("torch", [], "cpu")
    for model in (onnx_model, torch_model):
        assert (model.in_channels, model.num_classes, model.size_divisor, model.precision) == (3, 3, 32, "fp32")
        assert model.warnings == []


def test_onnx_and_torch_agree_across_sizes_and_padding(onnx_model: LoadedModel, torch_model: LoadedModel) -> None:
    tiles = random_tiles(3, SIZES)
    from_onnx = predict_probabilities(onnx_model, tiles)
    from_torch = predict_probabilities(torch_model, tiles, max_batch=1)
    for tile, a, b in zip(tiles, from_onnx, from_torch, strict=True):
        assert a.shape == b.shape == (3, *tile.shape[1:])
        assert a.dtype == b.dtype == np.float32
        assert float(np.abs(a - b).max()) < 1e-4


@pytest.mark.parametrize("size", [(64, 64), (97, 70)])
def test_probabilities_sum_to_one_and_equal_a_direct_model_call(
    torch_model: LoadedModel, rgb_torch_folder: Path, size: tuple[int, int]
) -> None:
    (tile,) = random_tiles(3, [size], seed=2)
    (probabilities,) = predict_probabilities(torch_model, [tile])
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, direct_probabilities(rgb_torch_folder, tile), atol=1e-5, rtol=0)
    averages = class_averages(probabilities)
    assert len(averages) == 3 and all(isinstance(value, float) for value in averages)
    assert sum(averages) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(averages, probabilities.mean(axis=(1, 2)), atol=1e-6)


def test_batches_keep_input_order_whatever_max_batch(torch_model: LoadedModel) -> None:
    tiles = random_tiles(3, [(64, 64), (40, 50), (64, 64), (33, 64), (64, 64)], seed=3)
    together = predict_probabilities(torch_model, tiles, max_batch=16)
    one_by_one = [predict_probabilities(torch_model, [tile], max_batch=1)[0] for tile in tiles]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def manual_flip_mean(model: LoadedModel, tile: np.ndarray) -> np.ndarray:
    runs = []
    for axes in [(), (2,), (1,), (1, 2)]:
        (probabilities,) = predict_probabilities(model, [np.ascontiguousarray(np.flip(tile, axes))])
        runs.append(np.flip(probabilities, axes))
    return np.mean(runs, axis=0)


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_tta_flip_is_the_mean_of_manually_flipped_runs(
    runtime: str, onnx_model: LoadedModel, torch_model: LoadedModel
) -> None:
    model = onnx_model if runtime == "onnx" else torch_model
    assert model.runtime == runtime
    tile, other = random_tiles(3, [(97, 70), (64, 64)], seed=4)
    with_tta = predict_probabilities(model, [tile, other], tta="flip")
    np.testing.assert_allclose(with_tta[0], manual_flip_mean(model, tile), atol=1e-5, rtol=0)
    np.testing.assert_allclose(with_tta[1], manual_flip_mean(model, other), atol=1e-5, rtol=0)
    plain = predict_probabilities(model, [tile])[0]
    assert float(np.abs(with_tta[0] - plain).max()) > 1e-4  # the transforms really ran
    np.testing.assert_allclose(with_tta[0].sum(axis=0), 1.0, atol=1e-5)


def test_tta_agrees_between_runtimes_and_d4_uses_transposes_on_square_tiles_only(
    onnx_model: LoadedModel, torch_model: LoadedModel
) -> None:
    square, oblong = random_tiles(3, [(64, 64), (64, 40)], seed=5)
    from_onnx = predict_probabilities(onnx_model, [square, oblong], tta="d4")
    from_torch = predict_probabilities(torch_model, [square, oblong], tta="d4")
    for a, b in zip(from_onnx, from_torch, strict=True):
        assert float(np.abs(a - b).max()) < 1e-4
    transposed = np.ascontiguousarray(square.transpose(0, 2, 1))
    expected = (
        manual_flip_mean(torch_model, square) + manual_flip_mean(torch_model, transposed).transpose(0, 2, 1)
    ) / 2
    np.testing.assert_allclose(from_torch[0], expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(from_torch[1], manual_flip_mean(torch_model, oblong), atol=1e-5, rtol=0)


def test_bf16_runs_on_pytorch_and_agrees_with_fp32(rgb_folder: Path, torch_model: LoadedModel) -> None:
    model = load_model(rgb_folder, use_gpu=False, precision="bf16")  # model.onnx exists; bf16 still means PyTorch
    assert (model.runtime, model.precision) == ("torch", "bf16")
    tiles = random_tiles(3, [(96, 96), (64, 64)], seed=6)
    low = predict_probabilities(model, tiles)
    full = predict_probabilities(torch_model, tiles)
    agree = np.concatenate([(a.argmax(0) == b.argmax(0)).ravel() for a, b in zip(low, full, strict=True)]).mean()
    print(f"bf16 vs fp32 argmax agreement: {agree:.4f}")
    assert agree >= 0.95
    for probabilities in low:
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_unknown_precision_is_a_schema_error(rgb_torch_folder: Path) -> None:
    with pytest.raises(DlwatchdError) as caught:
        load_model(rgb_torch_folder, use_gpu=False, precision="fp16")
    assert caught.value.code is ErrorCode.SCHEMA and caught.value.field == "options.precision"


@pytest.mark.parametrize(("in_channels", "onnx"), [(1, False), (5, True)])
def test_one_and_five_channel_models(tmp_path: Path, in_channels: int, onnx: bool) -> None:
    folder = make_model_folder(tmp_path / f"k{in_channels}", in_channels, 2, onnx=onnx)
    runtimes = [load_model(folder, use_gpu=False)]
    if onnx:
        runtimes.append(load_model(without_onnx(folder, tmp_path / "torch"), use_gpu=False))
    tiles = random_tiles(in_channels, [(64, 64), (50, 70)], seed=7)
    answers = []
    for model in runtimes:
        assert (model.in_channels, model.num_classes) == (in_channels, 2)
        answers.append(predict_probabilities(model, tiles))
        assert [probabilities.shape for probabilities in answers[-1]] == [(2, 64, 64), (2, 50, 70)]
    if onnx:
        for a, b in zip(*answers, strict=True):
            assert float(np.abs(a - b).max()) < 1e-4
    with pytest.raises(DlwatchdError) as caught:
        predict_probabilities(runtimes[0], random_tiles(3, [(64, 64)]))
    assert caught.value.code is ErrorCode.CHANNELS


def test_first_conv_weight_wins_over_metadata_channel_count(tmp_path: Path) -> None:
    folder = make_model_folder(tmp_path / "mismatch", 3, 2, onnx=False, metadata_channels=4)
    model = load_model(folder, use_gpu=False)
    assert model.in_channels == 3
    assert any("4 input channels" in warning and "3" in warning for warning in model.warnings)
    (probabilities,) = predict_probabilities(model, random_tiles(3, [(64, 64)]))
    assert probabilities.shape == (2, 64, 64)


class CreatesFile:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_malicious_model_pt_is_refused_without_running_it(rgb_torch_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    shutil.copytree(rgb_torch_folder, folder)
    marker = tmp_path / "pwned"
    torch.save({"conv.weight": torch.zeros(1), "payload": CreatesFile(marker)}, folder / "model.pt")
    assert not marker.exists()
    with pytest.raises(DlwatchdError) as caught:
        load_model(folder, use_gpu=False)
    assert caught.value.code is ErrorCode.UNSAFE_MODEL
    assert "model.pt" in caught.value.message
    assert not marker.exists()


def test_a_file_that_is_not_onnx_falls_back_to_model_pt(rgb_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    shutil.copytree(rgb_folder, folder)
    (folder / "model.onnx").write_bytes(b"this is not a protobuf")
    model = load_model(folder, use_gpu=False)
    assert model.runtime == "torch"
    assert any("model.onnx" in warning and "PyTorch" in warning for warning in model.warnings)
    (folder / "model.pt").unlink()
    with pytest.raises(DlwatchdError) as caught:
        load_model(folder, use_gpu=False)
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert "model.onnx" in caught.value.message and "model.pt" in caught.value.message


def test_a_folder_without_weights_is_not_found(rgb_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    for name in ("metadata.json", "preprocessing.json"):
        shutil.copy(rgb_folder / name, folder / name)
    with pytest.raises(DlwatchdError) as caught:
        load_model(folder, use_gpu=False)
    assert caught.value.code is ErrorCode.NOT_FOUND
    assert "no model.onnx or model.pt" in caught.value.message


def test_cache_reuses_reloads_on_change_evicts_and_clears(rgb_torch_folder: Path, tmp_path: Path) -> None:
    first_folder = tmp_path / "first"
    shutil.copytree(rgb_torch_folder, first_folder)
    cache = ModelCache(capacity=2)
    first = cache.get(first_folder, use_gpu=False, precision="fp32")
    assert cache.get(first_folder / "model.pt", use_gpu=False, precision="fp32") is first
    assert len(cache) == 1
    metadata = first_folder / "metadata.json"
    stat = metadata.stat()
    os.utime(metadata, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reloaded = cache.get(first_folder, use_gpu=False, precision="fp32")
    assert reloaded is not first and len(cache) == 1
    assert cache.get(first_folder, use_gpu=False, precision="fp32") is reloaded
    cache.get(first_folder, use_gpu=False, precision="bf16")
    cache.get(rgb_torch_folder, use_gpu=False, precision="fp32")
    assert len(cache) == 2  # capacity 2: the least recently used (the fp32 entry) went first
    assert cache.get(first_folder, use_gpu=False, precision="fp32") is not reloaded
    assert cache.clear() == 2 and len(cache) == 0


def model_info(tmp_path: Path, normalization: dict[str, Any] | None) -> Any:
    """The ModelInfo of a metadata-only folder; `normalization` None gives a client-schema model with no strategy."""
    folder = tmp_path / "info"
    folder.mkdir(parents=True)
    metadata: dict[str, Any] = {"architecture": {"type": "unet", "backbone": "resnet18"}, "classes": ["a", "b"]}
    if normalization is not None:
        metadata["input_config"] = {"num_channels": 3, "normalization": normalization}
    (folder / "metadata.json").write_text(json.dumps(metadata), encoding="utf-8")
    return read_model_info(folder)


def test_stored_normalization_wins_with_one_warning_per_differing_field(tmp_path: Path) -> None:
    info = model_info(tmp_path, STORED_NORMALIZATION)
    sent = {"strategy": "PERCENTILE_99", "per_channel": True, "clip_percentile": 99.5, "scope": None}
    config, warnings = resolve_normalization(info, sent, override=False)
    assert (config.strategy, config.per_channel, config.clip_percentile, config.scope) == (
        "percentile_99",
        False,
        99.5,
        "tile",
    )
    assert len(warnings) == 1 and "per_channel" in warnings[0] and "trained" in warnings[0]


def test_override_lets_the_request_win_field_by_field(tmp_path: Path) -> None:
    info = model_info(tmp_path, STORED_NORMALIZATION)
    config, warnings = resolve_normalization(info, {"per_channel": True, "clip_percentile": 98}, override=True)
    assert (config.per_channel, config.clip_percentile, config.strategy) == (True, 98.0, "percentile_99")
    assert len(warnings) == 2 and all("override" in warning for warning in warnings)


def test_request_fills_what_the_model_lacks_and_defaults_come_last(tmp_path: Path) -> None:
    info = model_info(tmp_path, {"strategy": "MIN_MAX"})  # client schema: the strategy only
    config, warnings = resolve_normalization(info, {"per_channel": False, "strategy": "min_max"}, override=False)
    assert (config.strategy, config.per_channel, config.clip_percentile, config.scope) == (
        "min_max",
        False,
        99.0,
        "tile",
    )
    assert warnings == []
    bare = model_info(tmp_path / "bare", None)
    config, warnings = resolve_normalization(bare, None, override=False)
    assert (config.strategy, config.per_channel, config.clip_percentile) == ("percentile_99", True, 99.0)
    assert warnings == []


def fake_model(tmp_path: Path, run: Any) -> LoadedModel:
    info = model_info(tmp_path, None)
    return LoadedModel(info, "torch", "cuda:0", [], 2, 1, 32, "fp32", [], _run=run)


def test_out_of_memory_halves_the_batch_then_fails_with_a_code(tmp_path: Path) -> None:
    seen: list[int] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape[0])
        if batch.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return np.concatenate([batch, -batch], axis=1)

    model = fake_model(tmp_path, run)
    tiles = random_tiles(1, [(32, 32)] * 7, seed=8)
    answers = predict_probabilities(model, tiles, max_batch=8)
    assert seen == [7, 4, 2, 2, 2, 1]
    for tile, probabilities in zip(tiles, answers, strict=True):
        np.testing.assert_allclose(probabilities[0], 1 / (1 + np.exp(-2 * tile[0])), atol=1e-6)

    def never_fits(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("onnxruntime: Failed to allocate memory for requested buffer; out of memory")

    with pytest.raises(DlwatchdError) as caught:
        predict_probabilities(fake_model(tmp_path / "again", never_fits), tiles, max_batch=4)
    assert caught.value.code is ErrorCode.OUT_OF_MEMORY


def test_bad_options_are_schema_errors(torch_model: LoadedModel) -> None:
    tiles = random_tiles(3, [(32, 32)])
    for options, field in [({"tta": "rot90"}, "options.tta"), ({"max_batch": 0}, "options.max_batch")]:
        with pytest.raises(DlwatchdError) as caught:
            predict_probabilities(torch_model, tiles, **options)
        assert caught.value.code is ErrorCode.SCHEMA and caught.value.field == field
    assert predict_probabilities(torch_model, []) == []


def test_a_gpu_that_onnxruntime_cannot_use_sends_the_model_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    from dlwatchd.engine import loading

    monkeypatch.setattr(loading, "detect_device_type", lambda: "cuda")
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert loading._onnx_lacks_gpu(True)
    assert not loading._onnx_lacks_gpu(False)  # use_gpu false: the CPU build of onnxruntime is the right choice
    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert not loading._onnx_lacks_gpu(True)
