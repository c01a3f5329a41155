"""Best epoch and early stopping of ENGINE §8.5, driven by scripted metric histories."""

from __future__ import annotations

import json

import pytest

from dlwatchd.engine.selection import EarlyStopping
from dlwatchd.errors import DlwatchdError, ErrorCode


def play(stopper: EarlyStopping, values: list[float | None]) -> tuple[list[bool], int | None]:
    """Feed `values` epoch by epoch as the training loop does; the improvement flags and the epoch it stopped at."""
    flags = []
    for epoch, value in enumerate(values):
        flags.append(stopper.update(epoch, value))
        if stopper.should_stop:
            return flags, epoch
    return flags, None


def test_min_mode_with_min_delta_and_patience() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=3, min_delta=0.01)
    # 0.995 is better but not by more than 0.01; 0.95 is; then three epochs without improvement stop it.
    flags, stopped = play(stopper, [1.0, 0.995, 0.95, 0.945, 0.96, 0.941, 0.5])
    assert flags == [True, False, True, False, False, False]
    assert stopped == 5
    assert (stopper.mode, stopper.best_epoch, stopper.best_value, stopper.counter) == ("min", 2, 0.95, 3)


def test_max_mode_for_mean_iou() -> None:
    stopper = EarlyStopping(monitor="mean_iou", patience=2, min_delta=0.001)
    flags, stopped = play(stopper, [0.2, 0.3, 0.3005, 0.31, 0.2, 0.3105, 0.9])
    assert flags == [True, True, False, True, False, False]
    assert stopped == 5
    assert (stopper.mode, stopper.best_epoch, stopper.best_value) == ("max", 3, 0.31)


def test_an_improvement_resets_the_counter() -> None:
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    flags, stopped = play(stopper, [1.0, 1.1, 0.9, 1.0, 0.8, 0.85, 0.85])
    assert flags == [True, False, True, False, True, False, False]
    assert stopped == 6


def test_non_finite_values_never_improve_even_first() -> None:
    stopper = EarlyStopping(patience=3)
    flags, stopped = play(stopper, [float("nan"), None, 2.0, float("-inf"), 1.0])
    assert flags == [False, False, True, False, True]
    assert stopped is None
    assert (stopper.best_epoch, stopper.best_value, stopper.counter) == (4, 1.0, 0)


def test_disabled_selects_the_strict_optimum_earliest_on_ties_and_never_stops() -> None:
    stopper = EarlyStopping(monitor="val_loss", patience=1, min_delta=0.5, enabled=False)
    flags, stopped = play(stopper, [1.0, 0.99, 0.99, 1.2, 1.3, 0.98])
    assert flags == [True, True, False, False, False, True]  # min_delta plays no part in the optimum
    assert stopped is None and not stopper.should_stop
    assert stopper.best_epoch == 5
    maximum = EarlyStopping(monitor="mean_iou", enabled=False)
    play(maximum, [0.1, 0.4, 0.4, 0.3])
    assert (maximum.best_epoch, maximum.best_value) == (1, 0.4)


def test_state_round_trip_through_json_continues_like_an_uninterrupted_run() -> None:
    history = [1.0, 0.9, 0.95, 0.97, 0.85, 0.9, 0.91, 0.92, 0.93]
    uninterrupted = EarlyStopping(patience=3)
    expected = play(uninterrupted, history)

    first = EarlyStopping(patience=3)
    flags = [first.update(epoch, value) for epoch, value in enumerate(history[:6])]
    state = json.loads(json.dumps(first.state_dict()))
    assert {"best_value", "best_epoch", "counter", "monitor", "mode"} <= set(state)
    second = EarlyStopping(patience=3)
    second.load_state_dict(state)
    assert (second.best_epoch, second.best_value, second.counter) == (4, 0.85, 1)
    for epoch, value in enumerate(history[6:], start=6):
        flags.append(second.update(epoch, value))
        if second.should_stop:
            break
    assert (flags, epoch) == expected
    assert second.state_dict() == uninterrupted.state_dict()


def test_state_of_another_monitor_and_unknown_monitors_are_refused() -> None:
    with pytest.raises(ValueError):
        EarlyStopping(monitor="mean_iou").load_state_dict(EarlyStopping().state_dict())
    with pytest.raises(DlwatchdError) as caught:
        EarlyStopping(monitor="accuracy")
    assert caught.value.code is ErrorCode.SCHEMA
    assert caught.value.field == "training.early_stopping_metric"
    assert "val_loss" in caught.value.message and "mean_iou" in caught.value.message
