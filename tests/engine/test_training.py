"""The fit loop in-process: tiny real smp models on 32-64 px tiles, CPU, seeded (ENGINE §3.6, §4.4, §6, §7.2, §8, §10).

Every model is built with `encoder_weights=None`, so nothing downloads. Runs that must agree start from the same
seeded initialisation and compare losses, metrics and weights to 1e-6.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dlwatchd.artifacts.metadata import build_preprocessing, read_model_info
from dlwatchd.catalog.architectures import list_architectures, resolve_architecture
from dlwatchd.engine import checkpoint as ckpt
from dlwatchd.engine.dataset import discover, preflight
from dlwatchd.engine.freezing import apply_freezing
from dlwatchd.engine.io import read_image, read_mask, select_channels
from dlwatchd.engine.models import create_model
from dlwatchd.engine.normalization import NormalizationConfig, Normalizer
from dlwatchd.engine.onnx_export import export_onnx
from dlwatchd.engine.tiles import TileSet, build_tileset, pad_to_multiple
from dlwatchd.engine.training import FitConfig, FitResult, Trainer, TrainingHooks, TrainingInterrupted, copy_to_cpu
from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs.train_publish import model_metadata
from dlwatchd.protocol.requests import TrainRequest
from dlwatchd.protocol.train_request import ResumeOverrides
from dlwatchd.synth import SynthSpec, write_dataset

U = 255
TWO_CLASSES = ["Background", "Foreground"]
TOLERANCE = 1e-6
# The reference eight and pan, in catalogue order (ENGINE §6.1).
CATALOGUE = ["unet", "unetplusplus", "deeplabv3", "deeplabv3plus", "fpn", "pspnet", "manet", "linknet", "pan"]
# Architectures whose ONNX graph may legitimately fail verification (ENGINE §11.2: adaptive pooling traced at one size).
ONNX_MAY_FAIL = {"pspnet"}
# Per-architecture run plus export: about 5 s each on 2 busy cores; the limit is for the whole parametrized set.
ARCHITECTURE_TIMEOUT_S = 180


# ---- helpers -------------------------------------------------------------------------------------------------------


def random_tiles(
    count: int,
    *,
    size: int = 32,
    channels: int = 3,
    classes: int = 2,
    seed: int = 0,
    labeled_fraction: float = 1.0,
    unlabeled: int = U,
) -> TileSet:
    """Images uniform in [0, 1] and masks with a random `labeled_fraction` of pixels labeled, the rest `unlabeled`."""
    generator = torch.Generator().manual_seed(seed)
    images, masks = [], []
    for _ in range(count):
        images.append(torch.rand(channels, size, size, generator=generator))
        mask = torch.randint(0, classes, (size, size), generator=generator)
        keep = torch.rand(size, size, generator=generator) < labeled_fraction
        masks.append(torch.where(keep, mask, torch.full_like(mask, unlabeled)))
    return TileSet(images, masks, [f"tile_{seed}_{i}" for i in range(count)])


def fresh_model(
    architecture: str = "unet", encoder: str = "resnet18", channels: int = 3, classes: int = 2, seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(architecture, encoder, channels, classes)


def fit_config(**overrides: Any) -> FitConfig:
    """Small, deterministic defaults: no augmentation, no schedule, no early stopping."""
    values: dict[str, Any] = {
        "class_names": TWO_CLASSES,
        "epochs": 2,
        "batch_size": 2,
        "learning_rate": 1e-3,
        "scheduler": "none",
        "early_stopping": False,
        "augmentation": False,
        "seed": 0,
        "device": "cpu",
    }
    values.update(overrides)
    return FitConfig(**values)


def make_trainer(
    model: torch.nn.Module,
    train: TileSet,
    validation: TileSet,
    checkpoint: Path,
    hooks: TrainingHooks | None = None,
    **config: Any,
) -> Trainer:
    return Trainer(model, train, validation, fit_config(**config), hooks or TrainingHooks(), checkpoint, {})


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}


def assert_states_close(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for key, value in first.items():
        other = second[key]
        if value.is_floating_point():
            assert torch.allclose(value, other, rtol=0.0, atol=TOLERANCE), key
        else:
            assert torch.equal(value, other), key


def assert_histories_match(first: list[dict[str, Any]], second: list[dict[str, Any]], *, learning_rate: bool = True):
    """Same epochs with the same losses and metrics; wall times naturally differ."""
    assert [h["epoch"] for h in first] == [h["epoch"] for h in second]
    for a, b in zip(first, second, strict=True):
        for key in ("train_loss", "val_loss", "accuracy", "mean_iou"):
            assert a[key] == pytest.approx(b[key], rel=0.0, abs=TOLERANCE), (a["epoch"], key)
        for key in ("per_class_iou", "per_class_loss"):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                assert a[key][name] == pytest.approx(b[key][name], rel=0.0, abs=TOLERANCE), (a["epoch"], key, name)
        assert a["is_best"] == b["is_best"], a["epoch"]
        if learning_rate:
            assert a["learning_rate"] == pytest.approx(b["learning_rate"], rel=1e-12), a["epoch"]


class RecordingCriterion:
    """Wraps the trainer's criterion and keeps every (logits, target, loss) it saw."""

    def __init__(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.criterion = criterion
        self.calls: list[tuple[torch.Tensor, torch.Tensor, float]] = []

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, target)
        self.calls.append((logits.detach().float().clone(), target.detach().clone(), float(loss.detach())))
        return loss


class Stop(Exception):
    """Stands in for JobCancelled: the trainer must let any check_cancel exception through."""


# ---- every catalogue architecture trains and exports ---------------------------------------------------------------


def train_one_epoch_and_export(architecture: str, encoder: str, size: int, tmp_path: Path) -> tuple[FitResult, dict]:
    model = fresh_model(architecture, encoder)
    trainer = make_trainer(
        model,
        random_tiles(4, size=size, seed=1, labeled_fraction=0.5),
        random_tiles(2, size=size, seed=2, labeled_fraction=0.5),
        tmp_path / "checkpoint.pt",
        epochs=1,
    )
    result = trainer.fit()
    # As publishing does: a CPU float32 copy with the best weights, in eval mode.
    exported = copy_to_cpu(trainer.model)
    exported.load_state_dict(result.best_state)
    exported.eval()
    onnx = export_onnx(
        exported,
        tmp_path / "model.onnx",
        in_channels=3,
        input_size=(size, size),
        size_divisor=resolve_architecture(architecture).size_divisor,
    )
    return result, onnx


def check_trained_and_exported(architecture: str, result: FitResult, onnx: dict, path: Path, size: int) -> None:
    assert result.epochs_trained == 1 and result.best_epoch == 1
    record = result.history[0]
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])
    assert 0.0 <= record["accuracy"] <= 1.0 and 0.0 <= record["mean_iou"] <= 1.0
    assert onnx["opset"] >= 17
    if onnx["verified"]:
        assert path.is_file()
        assert onnx["exported_shape"] == [1, 3, size, size]
        assert 0.0 <= onnx["max_abs_diff"] <= 1e-3  # the parity actually measured, recorded in the metadata
    else:
        # A legitimate failure is a report, never an exception, and leaves no model.onnx behind.
        assert architecture in ONNX_MAY_FAIL, onnx
        assert isinstance(onnx["error"], str) and onnx["error"]
        assert not path.exists()


def test_the_catalogue_list_is_the_registered_one() -> None:
    assert [entry.name for entry in list_architectures()] == CATALOGUE


@pytest.mark.timeout(ARCHITECTURE_TIMEOUT_S)
@pytest.mark.parametrize(
    ("architecture", "encoder", "size"),
    [
        *[
            pytest.param(name, "resnet18", 64, id=f"{name}-resnet18")
            for name in CATALOGUE
            if name != "pan"  # pan needs 128 px, see test_pan_on_64_px_tiles_fails_cleanly_or_trains
        ],
        pytest.param("pan", "resnet18", 128, id="pan-resnet18-128px"),
        pytest.param("unet", "mobilenet_v2", 64, id="unet-mobilenet_v2"),
        pytest.param("unet", "efficientnet-b0", 64, id="unet-efficientnet-b0"),
    ],
)
def test_architecture_trains_one_epoch_and_exports(architecture: str, encoder: str, size: int, tmp_path: Path) -> None:
    result, onnx = train_one_epoch_and_export(architecture, encoder, size, tmp_path)
    check_trained_and_exported(architecture, result, onnx, tmp_path / "model.onnx", size)


@pytest.mark.xfail(
    strict=True,
    reason="PAN's feature-pyramid attention pools the stride-16 map three times, so it needs input sides >= 128 px; "
    "neither the catalogue nor preflight knows, and 64 px tiles crash mid-training with a bare RuntimeError",
)
def test_pan_on_64_px_tiles_fails_cleanly_or_trains(tmp_path: Path) -> None:
    """Either preflight refuses the tile size with a DlwatchdError, or the tiles are padded and one epoch trains."""
    data = tmp_path / "data"
    write_dataset(data, SynthSpec(train=4, validation=2, size=64))
    index = discover(data)
    try:
        preflight(
            index,
            num_channels=3,
            selected_channels=None,
            class_names=["Background", "Nucleus"],
            class_weights=None,
            architecture="pan",
            bit_depth=8,
        )
    except DlwatchdError:
        return  # refused before epoch 1, naming the problem: acceptable
    normalizer = Normalizer(NormalizationConfig())

    def tiles(samples: list) -> TileSet:
        return build_tileset(
            [
                (s.stem, lambda s=s: normalizer.apply(read_image(s.image))[0], lambda s=s: read_mask(s.mask))
                for s in samples
            ],
            divisor=resolve_architecture("pan").size_divisor,
            unlabeled_index=U,
        )

    trainer = make_trainer(
        fresh_model("pan"),
        tiles(index.train),
        tiles(index.validation),
        tmp_path / "c.pt",
        epochs=1,
        class_names=["Background", "Nucleus"],
    )
    assert trainer.fit().epochs_trained == 1


# ---- sparse labels, ignored pixels, class weights ------------------------------------------------------------------


def test_sparse_masks_train_with_finite_losses(tmp_path: Path) -> None:
    train = random_tiles(4, seed=1, labeled_fraction=0.03)
    validation = random_tiles(2, seed=2, labeled_fraction=0.03)
    # Two training tiles and one validation tile without a single label: with batch 2 some batch may be all U.
    train.masks[0].fill_(U)
    train.masks[3].fill_(U)
    validation.masks[1].fill_(U)
    labeled = sum(int((mask != U).sum()) for mask in validation.masks)
    assert 0 < labeled < 0.05 * 2 * 32 * 32

    result = make_trainer(fresh_model(), train, validation, tmp_path / "c.pt", epochs=3).fit()

    for record in result.history:
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"]), record
        assert all(value is not None and math.isfinite(value) for value in record["per_class_loss"].values())
    matrix = result.best_metrics["confusion_matrix"]
    assert sum(map(sum, matrix)) == labeled  # only labeled pixels enter the metrics


def test_ignored_pixels_take_no_part_and_class_weights_count(tmp_path: Path) -> None:
    weights = [1.0, 3.0]
    trainer = make_trainer(
        fresh_model(),
        random_tiles(4, seed=1, labeled_fraction=0.3),
        random_tiles(2, seed=2, labeled_fraction=0.3),
        tmp_path / "c.pt",
        epochs=1,
        class_weights=weights,
    )
    recorder = RecordingCriterion(trainer.criterion)
    trainer.criterion = recorder  # type: ignore[assignment]
    trainer.fit()
    assert len(recorder.calls) == 2 + 1  # two training batches, one validation batch

    weight = torch.tensor(weights)
    for logits, target, loss in recorder.calls:
        labeled = target != U
        # The loss the trainer used is torch's weighted CE over labeled pixels only (ENGINE §8.1) ...
        expected = F.cross_entropy(logits, target, weight=weight, ignore_index=U)
        assert loss == pytest.approx(float(expected), rel=1e-6)
        # ... which the class weights really change ...
        unweighted = F.cross_entropy(logits, target, ignore_index=U)
        assert abs(loss - float(unweighted)) > 1e-4
        # ... and which does not move when the logits at ignored pixels become anything at all.
        garbage = logits.clone()
        garbage.permute(0, 2, 3, 1)[~labeled] = 1e4 * torch.randn(int((~labeled).sum()), logits.shape[1])
        assert float(trainer.criterion.criterion(garbage, target)) == pytest.approx(loss, rel=1e-6)
        probe = logits.clone().requires_grad_(True)
        trainer.criterion.criterion(probe, target).backward()
        assert probe.grad is not None
        assert torch.count_nonzero(probe.grad.permute(0, 2, 3, 1)[~labeled]) == 0


def test_class_weights_change_the_training(tmp_path: Path) -> None:
    train, validation = random_tiles(4, seed=1, labeled_fraction=0.5), random_tiles(2, seed=2, labeled_fraction=0.5)
    plain = make_trainer(fresh_model(), train, validation, tmp_path / "a.pt", epochs=1).fit()
    weighted = make_trainer(
        fresh_model(), train, validation, tmp_path / "b.pt", epochs=1, class_weights=[1.0, 4.0]
    ).fit()
    assert abs(plain.history[0]["train_loss"] - weighted.history[0]["train_loss"]) > 1e-4
    assert abs(plain.history[0]["val_loss"] - weighted.history[0]["val_loss"]) > 1e-4


def test_the_unlabeled_index_is_the_configured_one(tmp_path: Path) -> None:
    """Marking the same pixels with U = 254 instead of 255 changes nothing, augmentation (fills with U) included."""
    train, validation = random_tiles(4, seed=1, labeled_fraction=0.4), random_tiles(2, seed=2, labeled_fraction=0.4)

    def relabel(tiles: TileSet) -> TileSet:
        return TileSet(
            tiles.images, [torch.where(m == U, torch.full_like(m, 254), m) for m in tiles.masks], tiles.names
        )

    common = {"epochs": 2, "augmentation": True, "augmentation_config": {"p_rotate": 1.0, "p_elastic": 0.5}}
    at_255 = make_trainer(fresh_model(), train, validation, tmp_path / "a.pt", **common).fit()
    at_254 = make_trainer(
        fresh_model(), relabel(train), relabel(validation), tmp_path / "b.pt", unlabeled_index=254, **common
    ).fit()
    assert_histories_match(at_255.history, at_254.history)
    assert_states_close(at_255.best_state, at_254.best_state)


# ---- best epoch ----------------------------------------------------------------------------------------------------


def spoil_after_epoch(model_holder: dict[str, Any], spoil_at: int, snapshots: list[dict[str, torch.Tensor]]):
    """An epoch_done hook that snapshots the weights and wrecks the head after epoch `spoil_at`."""

    def epoch_done(history: list[dict[str, Any]]) -> None:
        model = model_holder["model"]
        snapshots.append(state_of(model))
        if len(history) == spoil_at:
            generator = torch.Generator().manual_seed(123)
            with torch.no_grad():
                for parameter in model.segmentation_head.parameters():
                    parameter.copy_(20.0 * torch.randn(parameter.shape, generator=generator))

    return epoch_done


def spoiled_trainer(tmp_path: Path, **config: Any) -> tuple[Trainer, list[dict[str, torch.Tensor]]]:
    """A trainer whose model is made worse after epoch 2, and the snapshots of its weights after each epoch."""
    snapshots: list[dict[str, torch.Tensor]] = []
    model = fresh_model()
    trainer = make_trainer(
        model,
        random_tiles(4, seed=1, labeled_fraction=0.5),
        random_tiles(2, seed=2, labeled_fraction=0.5),
        tmp_path / "c.pt",
        TrainingHooks(epoch_done=spoil_after_epoch({"model": model}, 2, snapshots)),
        **config,
    )
    return trainer, snapshots


def test_best_epoch_is_the_argmin_of_val_loss_and_final_metrics_come_from_it(tmp_path: Path) -> None:
    trainer, snapshots = spoiled_trainer(tmp_path, epochs=4, scheduler="cosine")
    result = trainer.fit()

    losses = [record["val_loss"] for record in result.history]
    best = int(np.argmin(losses))
    assert best + 1 < len(losses), f"the scripted run should get worse after epoch 2: {losses}"
    assert result.best_epoch == best + 1
    assert result.epochs_trained == 4 and not result.early_stopped and result.stop_reason == "epochs_done"
    # final_* of the result are the best epoch's, last_* the last epoch's (ENGINE §8.7).
    for key in ("val_loss", "accuracy", "mean_iou", "per_class_iou"):
        assert result.best_metrics[key] == result.history[best][key]
    assert result.best_metrics["epoch"] == best + 1
    assert result.last_metrics is result.history[-1]
    assert result.history[best]["is_best"] is True
    assert not any(record["is_best"] for record in result.history[best + 1 :])
    # The weights returned are the best epoch's, not the last ones.
    assert_states_close(result.best_state, snapshots[best])
    assert any(not torch.equal(result.best_state[k], v) for k, v in state_of(trainer.model).items())


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    trainer, snapshots = spoiled_trainer(tmp_path, epochs=6, early_stopping=True, patience=2, min_delta=0.0)
    result = trainer.fit()
    assert result.early_stopped and result.stop_reason == "early_stopping"
    losses = [record["val_loss"] for record in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1 <= 2
    assert result.epochs_trained == result.best_epoch + 2 < 6  # stopped after `patience` epochs without improvement
    assert_states_close(result.best_state, snapshots[result.best_epoch - 1])


# ---- checkpoint and resume -----------------------------------------------------------------------------------------


RESUME_DATA = {"train": (4, 1), "validation": (2, 2)}


def resume_tiles() -> tuple[TileSet, TileSet]:
    return (
        random_tiles(RESUME_DATA["train"][0], seed=RESUME_DATA["train"][1], labeled_fraction=0.6),
        random_tiles(RESUME_DATA["validation"][0], seed=RESUME_DATA["validation"][1], labeled_fraction=0.6),
    )


def test_pause_at_an_epoch_boundary_then_resume_equals_a_straight_run(tmp_path: Path) -> None:
    train, validation = resume_tiles()
    config = {"epochs": 4, "scheduler": "cosine"}
    straight_trainer = make_trainer(fresh_model(), train, validation, tmp_path / "straight.pt", **config)
    straight = straight_trainer.fit()

    path = tmp_path / "paused.pt"
    done: list[int] = []
    hooks = TrainingHooks(epoch_done=lambda history: done.append(len(history)), pause_requested=lambda: len(done) >= 2)
    with pytest.raises(TrainingInterrupted) as interruption:
        make_trainer(fresh_model(), train, validation, path, hooks, **config).fit()
    assert interruption.value.reason == "pause"
    assert done == [1, 2]

    state = ckpt.load_checkpoint(path)  # weights_only=True inside
    assert state["position"]["epoch"] == 2 and state["position"]["batch_in_epoch"] == 0
    assert len(state["training_history"]) == 2
    for key in ("model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "best_model_state", "rng"):
        assert key in state, key
    assert {"best_value", "best_epoch", "counter", "monitor", "mode"} <= state["early_stopping"].keys()

    # Another initialisation on purpose: everything must come from the checkpoint.
    resumed_trainer = make_trainer(fresh_model(seed=99), train, validation, path, **config)
    resumed_trainer.resume_from(state)
    resumed = resumed_trainer.fit()

    assert_histories_match(straight.history, resumed.history)
    assert resumed.best_epoch == straight.best_epoch
    assert_states_close(state_of(straight_trainer.model), state_of(resumed_trainer.model))
    assert_states_close(straight.best_state, resumed.best_state)


@pytest.mark.parametrize("scheduler", ["cosine", "step", "onecycle"])
def test_mid_epoch_suspend_then_pause_then_resume_equals_a_straight_run(tmp_path: Path, scheduler: str) -> None:
    train, validation = resume_tiles()
    config = {"epochs": 4, "scheduler": scheduler}
    straight_trainer = make_trainer(fresh_model(), train, validation, tmp_path / "straight.pt", **config)
    straight = straight_trainer.fit()

    path = tmp_path / "interrupted.pt"
    batches = []

    def suspend() -> bool:  # asked before every training batch; True before the second batch of epoch 2
        batches.append(1)
        return len(batches) == 4

    with pytest.raises(TrainingInterrupted) as interruption:
        make_trainer(fresh_model(), train, validation, path, TrainingHooks(suspend_requested=suspend), **config).fit()
    assert interruption.value.reason == "suspend"
    state = ckpt.load_checkpoint(path)
    position = state["position"]
    assert (position["epoch"], position["batch_in_epoch"], position["global_step"]) == (1, 1, 3)
    assert sorted(position["permutation"]) == list(range(len(train))) and position["partial_batches"] == 1

    # Second leg: resume mid-epoch, then pause at the end of epoch 3.
    second = make_trainer(
        fresh_model(seed=98),
        train,
        validation,
        path,
        TrainingHooks(pause_requested=lambda: len(second.history) >= 3),
        **config,
    )
    second.resume_from(state)
    with pytest.raises(TrainingInterrupted, match="pause"):
        second.fit()

    third = make_trainer(fresh_model(seed=97), train, validation, path, **config)
    third.resume_from(ckpt.load_checkpoint(path))
    resumed = third.fit()

    # Learning rates are compared in their own test (xfail for onecycle below).
    assert_histories_match(straight.history, resumed.history, learning_rate=False)
    assert resumed.best_epoch == straight.best_epoch
    assert_states_close(state_of(straight_trainer.model), state_of(third.model))
    assert_states_close(straight.best_state, resumed.best_state)
    assert third.global_step == straight_trainer.global_step == 8


@pytest.mark.xfail(
    strict=True,
    reason="training.py:306 records the group lr when fit() starts, which after a mid-epoch resume is the lr at the "
    "resume batch, not at the start of the epoch (differs for the per-batch onecycle schedule)",
)
def test_mid_epoch_resume_records_the_learning_rate_at_the_start_of_the_epoch(tmp_path: Path) -> None:
    train, validation = resume_tiles()
    config = {"epochs": 3, "scheduler": "onecycle"}
    straight = make_trainer(fresh_model(), train, validation, tmp_path / "a.pt", **config).fit()
    calls = []

    def suspend() -> bool:
        calls.append(1)
        return len(calls) == 4  # epoch 2, batch 2

    path = tmp_path / "b.pt"
    with pytest.raises(TrainingInterrupted):
        make_trainer(fresh_model(), train, validation, path, TrainingHooks(suspend_requested=suspend), **config).fit()
    resumed_trainer = make_trainer(fresh_model(), train, validation, path, **config)
    resumed_trainer.resume_from(ckpt.load_checkpoint(path))
    resumed = resumed_trainer.fit()
    assert [h["learning_rate"] for h in resumed.history] == pytest.approx(
        [h["learning_rate"] for h in straight.history]
    )


@pytest.mark.xfail(
    strict=True,
    reason="Trainer.resume_from (training.py:213) keeps the ScheduleSpec re-resolved from the new `epochs` instead of "
    "the checkpoint's `schedule`, so T_0/step_size reported in the metadata differ from the ones the restored "
    "scheduler really uses (ENGINE §8.3: resolved once and stored)",
)
@pytest.mark.parametrize(("scheduler", "key"), [("cosine", "T_0"), ("step", "step_size")])
def test_a_resume_with_more_epochs_keeps_the_stored_schedule(tmp_path: Path, scheduler: str, key: str) -> None:
    train, validation = resume_tiles()
    path = tmp_path / "c.pt"
    with pytest.raises(TrainingInterrupted):
        make_trainer(
            fresh_model(),
            train,
            validation,
            path,
            TrainingHooks(pause_requested=lambda: True),
            epochs=4,
            scheduler=scheduler,
        ).fit()
    state = ckpt.load_checkpoint(path)
    stored = state["schedule"]["params"][key]
    assert stored == 1  # max(4 // 3, 1)
    resumed = make_trainer(fresh_model(), train, validation, path, epochs=9, scheduler=scheduler)
    resumed.resume_from(state)
    assert getattr(resumed.scheduler, key) == stored  # the torch scheduler state is restored ...
    assert resumed.schedule.params[key] == stored  # ... and the spec that goes into the metadata must agree


@pytest.mark.xfail(
    strict=True,
    reason="training.py:363 and :371 call pause_requested() twice: a pause marker appearing between the calls "
    "interrupts the run without writing the checkpoint when checkpoint_every does not fall on this epoch",
)
def test_a_pause_always_leaves_a_checkpoint_of_the_epoch(tmp_path: Path) -> None:
    train, validation = resume_tiles()
    answers = iter([False, True, True, True, True])  # the marker shows up right after the first look
    path = tmp_path / "c.pt"
    with pytest.raises(TrainingInterrupted):
        make_trainer(
            fresh_model(),
            train,
            validation,
            path,
            TrainingHooks(pause_requested=lambda: next(answers)),
            epochs=3,
            checkpoint_every=0,
        ).fit()
    assert path.exists()
    assert ckpt.load_checkpoint(path)["position"]["epoch"] == 1


# ---- cancel --------------------------------------------------------------------------------------------------------


def test_cancel_stops_within_one_training_batch(tmp_path: Path) -> None:
    steps: list[int] = []

    def progress(fields: dict[str, Any], force: bool) -> None:
        if fields.get("phase") == "train" and "batch" in fields:
            steps.append(fields["batch"])

    def check_cancel() -> None:
        if len(steps) >= 4:
            raise Stop()

    trainer = make_trainer(
        fresh_model(),
        random_tiles(6, seed=1),
        random_tiles(2, seed=2),
        tmp_path / "c.pt",
        TrainingHooks(progress=progress, check_cancel=check_cancel),
        epochs=3,
    )
    with pytest.raises(Stop):
        trainer.fit()
    # Three batches per epoch: the fourth step was the first of epoch 2, and not one step more followed.
    assert trainer.global_step == 4
    assert steps == [1, 2, 3, 1]
    assert len(trainer.history) == 1


def test_cancel_between_validation_batches(tmp_path: Path) -> None:
    validating: list[bool] = []
    checks_in_validation: list[int] = []

    def progress(fields: dict[str, Any], force: bool) -> None:
        if fields.get("phase") == "validate":
            validating.append(True)

    def check_cancel() -> None:
        if validating:
            checks_in_validation.append(1)
            if len(checks_in_validation) == 2:
                raise Stop()

    trainer = make_trainer(
        fresh_model(),
        random_tiles(4, seed=1),
        random_tiles(4, seed=2),  # two validation batches
        tmp_path / "c.pt",
        TrainingHooks(progress=progress, check_cancel=check_cancel),
        epochs=2,
    )
    recorder = RecordingCriterion(trainer.criterion)
    trainer.criterion = recorder  # type: ignore[assignment]
    with pytest.raises(Stop):
        trainer.fit()
    assert len(recorder.calls) == 2 + 1  # two training batches, then one validation batch before the cancel
    assert trainer.history == []
    assert trainer.model.training  # validation's eval() is undone on the way out


# ---- non-finite losses ---------------------------------------------------------------------------------------------


def test_two_non_finite_epochs_fail_with_e_nan_loss(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    model = fresh_model()
    holder: dict[str, Trainer] = {}

    def poison() -> None:  # asked before every batch; from epoch 2 on the head's weights are NaN
        if len(holder["trainer"].history) == 1:
            with torch.no_grad():
                model.segmentation_head[0].weight.fill_(math.nan)

    trainer = make_trainer(
        model,
        random_tiles(4, seed=1),
        random_tiles(2, seed=2),
        path,
        TrainingHooks(check_cancel=poison),
        epochs=5,
    )
    holder["trainer"] = trainer
    with pytest.raises(DlwatchdError) as error:
        trainer.fit()
    assert error.value.code == ErrorCode.NAN_LOSS == "E_NAN_LOSS"
    assert "epoch 3" in error.value.message and "learning rate" in (error.value.hint or "").lower()
    assert [record["epoch"] for record in trainer.history] == [1, 2]
    assert trainer.history[1]["train_loss"] is None and trainer.history[1]["val_loss"] is None
    # The last checkpoint is the last good epoch's.
    state = ckpt.load_checkpoint(path)
    assert state["position"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values() if v.is_floating_point())


def test_one_non_finite_epoch_is_survived(tmp_path: Path) -> None:
    validation = random_tiles(2, seed=2)
    clean = validation.images[0].clone()

    def epoch_done(history: list[dict[str, Any]]) -> None:
        # Only epoch 2 sees a NaN pixel in validation; the weights never see it.
        validation.images[0] = clean.clone().fill_(math.nan) if len(history) == 1 else clean

    result = make_trainer(
        fresh_model(),
        random_tiles(4, seed=1),
        validation,
        tmp_path / "c.pt",
        TrainingHooks(epoch_done=epoch_done),
        epochs=4,
    ).fit()
    assert result.epochs_trained == 4
    assert result.history[1]["val_loss"] is None and result.history[1]["is_best"] is False
    assert all(math.isfinite(result.history[i]["val_loss"]) for i in (0, 2, 3))
    assert result.best_epoch != 2


# ---- freezing ------------------------------------------------------------------------------------------------------


def parameters_under(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.startswith(prefix + ".")}


def buffers_under(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers() if name.startswith(prefix + ".")}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    now = dict(model.named_parameters())
    return any(not torch.equal(value, now[name].detach()) for name, value in before.items())


def test_frozen_groups_keep_their_weights_and_the_others_train(tmp_path: Path) -> None:
    model = fresh_model()
    applied, warnings = apply_freezing(model, ["encoder.conv1", "encoder.layer1"], 3)
    assert applied == ["encoder.conv1", "encoder.layer1"] and warnings == []
    frozen = {**parameters_under(model, "encoder.conv1"), **parameters_under(model, "encoder.layer1")}
    frozen_buffers = buffers_under(model, "encoder.layer1")
    trained = {p: parameters_under(model, p) for p in ("encoder.bn1", "encoder.layer2", "decoder", "segmentation_head")}

    trainer = make_trainer(model, random_tiles(4, seed=1), random_tiles(2, seed=2), tmp_path / "c.pt", epochs=1)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in optimized for name, p in model.named_parameters() if name in frozen)
    trainer.fit()

    now = dict(model.named_parameters())
    for name, value in frozen.items():
        assert torch.equal(value, now[name].detach()), name
        assert not now[name].requires_grad
    for prefix, before in trained.items():
        assert changed(before, model), prefix
    # Reference behaviour (ENGINE §7.2): BatchNorm in frozen groups stays in train mode, its statistics move.
    buffers = dict(model.named_buffers())
    assert any(not torch.equal(v, buffers[n]) for n, v in frozen_buffers.items() if n.endswith("running_mean"))


def test_a_slice_freezes_exactly_its_children(tmp_path: Path) -> None:
    model = fresh_model(encoder="mobilenet_v2")
    applied, _ = apply_freezing(model, ["encoder.features[2:5]"], 3)
    assert applied == ["encoder.features[2:5]"]
    inside = {i: parameters_under(model, f"encoder.features.{i}") for i in (2, 3, 4)}
    outside = {i: parameters_under(model, f"encoder.features.{i}") for i in (0, 1, 5, 6)}
    make_trainer(model, random_tiles(4, seed=1), random_tiles(2, seed=2), tmp_path / "c.pt", epochs=1).fit()
    for index, before in inside.items():
        assert before and not changed(before, model), index
    for index, before in outside.items():
        assert changed(before, model), index


def test_a_stem_freeze_is_dropped_for_other_than_three_channels(tmp_path: Path) -> None:
    model = fresh_model(channels=1)
    applied, warnings = apply_freezing(model, ["encoder.conv1", "encoder.layer1"], 1)
    assert applied == ["encoder.layer1"]
    assert len(warnings) == 1 and "encoder.conv1" in warnings[0]
    stem = parameters_under(model, "encoder.conv1")
    make_trainer(
        model, random_tiles(4, channels=1, seed=1), random_tiles(2, channels=1, seed=2), tmp_path / "c.pt", epochs=1
    ).fit()
    assert changed(stem, model)


def test_freezing_is_reapplied_after_a_resume(tmp_path: Path) -> None:
    train, validation = resume_tiles()
    names = ["encoder.layer1", "encoder.layer2"]

    def frozen_model(seed: int) -> torch.nn.Module:
        model = fresh_model(seed=seed)
        apply_freezing(model, names, 3)  # what train_setup.prepare does before building the Trainer
        return model

    initial = frozen_model(0)
    frozen_at_start = {**parameters_under(initial, "encoder.layer1"), **parameters_under(initial, "encoder.layer2")}
    straight_trainer = make_trainer(initial, train, validation, tmp_path / "a.pt", epochs=3)
    straight_trainer.fit()

    path = tmp_path / "b.pt"
    with pytest.raises(TrainingInterrupted):
        make_trainer(
            frozen_model(0), train, validation, path, TrainingHooks(pause_requested=lambda: True), epochs=3
        ).fit()
    state = ckpt.load_checkpoint(path)
    resumed = make_trainer(frozen_model(5), train, validation, path, epochs=3)
    resumed.resume_from(state)
    apply_freezing(resumed.model, names, 3)  # what TrainSetup.reapply_after_resume does
    resumed.fit()

    now = dict(resumed.model.named_parameters())
    for name, value in frozen_at_start.items():
        assert not now[name].requires_grad, name
        assert torch.equal(value, now[name].detach()), name  # the checkpoint's values, never trained
    assert_states_close(state_of(straight_trainer.model), state_of(resumed.model))


# ---- precision -----------------------------------------------------------------------------------------------------


def test_bf16_autocast_on_cpu_trains_with_finite_losses_and_fp32_weights(tmp_path: Path) -> None:
    trainer = make_trainer(
        fresh_model(), random_tiles(4, seed=1), random_tiles(2, seed=2), tmp_path / "c.pt", epochs=1, precision="bf16"
    )
    result = trainer.fit()
    assert math.isfinite(result.history[0]["train_loss"]) and math.isfinite(result.history[0]["val_loss"])
    assert all(v.dtype == torch.float32 for v in result.best_state.values() if v.is_floating_point())


# ---- normalization identity (ENGINE §4.4) --------------------------------------------------------------------------


def fake_context(root: Path) -> SimpleNamespace:
    """The few JobContext members train_setup.prepare uses."""
    messages: list[str] = []
    return SimpleNamespace(
        weights_dir=root / "weights",
        read_roots=[root],
        warn=lambda code, message: messages.append(f"{code}: {message}"),
        log=messages.append,
        messages=messages,
    )


def train_request(
    data: Path, normalization: dict[str, Any], *, selected: list[int] | None, channels: int
) -> TrainRequest:
    return TrainRequest.model_validate(
        {
            "kind": "train",
            "model_type": "unet",
            "architecture": {"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False},
            "input_config": {
                "num_channels": channels,
                "bit_depth": 16,
                "selected_channels": selected,
                "normalization": normalization,
            },
            "classes": ["Background", "Nucleus"],
            "training": {"epochs": 1, "batch_size": 2, "seed": 0, "device": "cpu", "precision": "fp32"},
            "data_path": str(data),
        }
    )


def published_normalization(tmp_path: Path, request: TrainRequest, setup: Any) -> tuple[dict, list[int] | None]:
    """Metadata written by train_publish's own function, then read back the way inference reads a model."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    metadata = model_metadata(request, setup, "model", training={}, onnx={})
    (model_dir / "metadata.json").write_text(json.dumps(metadata, allow_nan=False))
    (model_dir / "preprocessing.json").write_text(json.dumps(build_preprocessing(metadata), allow_nan=False))
    info = read_model_info(model_dir)
    assert info.normalization is not None
    return info.normalization, info.selected_channels


@pytest.mark.parametrize(
    ("normalization", "size"),
    [
        pytest.param({"strategy": "percentile_99", "per_channel": True, "scope": "tile"}, 64, id="p99-tile"),
        pytest.param({"strategy": "PERCENTILE_99", "per_channel": False, "scope": "tile"}, 40, id="p99-joint-tile"),
        pytest.param(
            {"strategy": "percentile_99", "per_channel": False, "scope": "dataset", "clip_percentile": 97.5},
            64,
            id="p99-joint-dataset",
        ),
        pytest.param({"strategy": "min_max", "per_channel": True, "scope": "dataset"}, 64, id="minmax-dataset"),
        pytest.param({"strategy": "min_max", "per_channel": False, "scope": "dataset"}, 40, id="minmax-joint-dataset"),
        pytest.param({"strategy": "z_score", "per_channel": False, "scope": "dataset"}, 64, id="z-joint-dataset"),
        pytest.param({"strategy": "z_score", "per_channel": True, "scope": "tile"}, 64, id="z-tile"),
        pytest.param(
            {"strategy": "fixed_range", "fixed_min": [0, 1000], "fixed_max": [60000, 50000]},
            64,
            id="fixed-per-channel",
        ),
    ],
)
def test_inference_rebuilds_exactly_the_training_tensor(
    tmp_path: Path, normalization: dict[str, Any], size: int
) -> None:
    from dlwatchd.jobs.train_setup import prepare

    data = tmp_path / "data"
    write_dataset(data, SynthSpec(train=3, validation=2, size=size, channels=3, bit_depth=16, seed=4))
    selected = [2, 0]  # select, then normalize (reference defect 26)
    request = train_request(data, normalization, selected=selected, channels=2)
    setup = prepare(fake_context(tmp_path), request, None, ResumeOverrides())  # type: ignore[arg-type]
    if normalization.get("scope") == "dataset":
        assert setup.normalization.stats is not None
        assert len(setup.normalization.stats) == (2 if normalization["per_channel"] else 1)

    stored, stored_selection = published_normalization(tmp_path, request, setup)
    assert stored_selection == selected
    inference = Normalizer(NormalizationConfig.from_dict(json.loads(json.dumps(stored))))
    assert NormalizationConfig.from_dict(stored) == setup.normalization

    divisor = resolve_architecture("unet").size_divisor
    index = discover(data)
    for samples, tiles in ((index.train, setup.train), (index.validation, setup.validation)):
        assert [s.stem for s in samples] == tiles.names
        for sample, fed in zip(samples, tiles.images, strict=True):
            raw = select_channels(read_image(sample.image), stored_selection, name=sample.image.name)
            normalized, _ = inference.apply(raw)
            built = torch.from_numpy(np.ascontiguousarray(normalized.transpose(2, 0, 1)))
            assert torch.equal(fed[:, :size, :size], built), sample.stem
            padded, _ = pad_to_multiple(built, None, divisor, U)
            assert torch.equal(fed, padded), sample.stem


@pytest.mark.xfail(
    strict=True,
    reason="jobs/train_setup.py:244 checkpoint_extra lacks `dataset_fingerprint` and `versions` (ENGINE §10.3), so a "
    "resume cannot warn about changed data (§10.4)",
)
def test_the_checkpoint_records_the_dataset_fingerprint_and_versions(tmp_path: Path) -> None:
    from dlwatchd.jobs.train_setup import prepare

    data = tmp_path / "data"
    write_dataset(data, SynthSpec(train=2, validation=1, size=32))
    request = TrainRequest.model_validate(
        {
            "kind": "train",
            "model_type": "unet",
            "architecture": {"backbone": "resnet18", "input_size": [32, 32], "use_pretrained": False},
            "input_config": {"num_channels": 3},
            "classes": ["Background", "Nucleus"],
            "training": {"seed": 0, "device": "cpu"},
            "data_path": str(data),
        }
    )
    setup = prepare(fake_context(tmp_path), request, None, ResumeOverrides())  # type: ignore[arg-type]
    assert {"dataset_fingerprint", "versions", "frozen_layers", "training_config"} <= setup.checkpoint_extra.keys()
