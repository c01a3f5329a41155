"""Schedules of ENGINE §8.3: resolved defaults, lr sequences, and the resume rules of §10.4."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dlwatchd.engine.schedules import (
    ScheduleSpec,
    apply_learning_rate_override,
    build_scheduler,
    list_schedulers,
    rebuild_onecycle,
    resolve_schedule,
    step_batch,
    step_epoch,
)
from dlwatchd.errors import DlwatchdError, ErrorCode

LR = 0.01


def make_optimizer(lr: float = LR, kind: str = "adam") -> torch.optim.Optimizer:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4))]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, weight_decay=1e-4)


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """One real optimizer step, so schedulers see the order torch expects."""
    parameter = optimizer.param_groups[0]["params"][0]
    optimizer.zero_grad()
    (parameter**2).sum().backward()
    optimizer.step()


def epoch_lrs(spec: ScheduleSpec, epochs: int, lr: float = LR) -> list[float]:
    """The lr recorded at the start of each epoch (§8.4) with one optimizer step per epoch."""
    optimizer = make_optimizer(lr)
    scheduler = build_scheduler(spec, optimizer)
    seen = []
    for epoch in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer)
        step_epoch(scheduler, spec, epoch)
    return seen


def batch_lrs(spec: ScheduleSpec, steps: int, lr: float = LR) -> list[float]:
    """The lr of each optimizer step of a batch-stepped schedule."""
    optimizer = make_optimizer(lr)
    scheduler = build_scheduler(spec, optimizer)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer)
        step_batch(scheduler, spec)
    return seen


def resolve(name: str | None, cfg: dict | None = None, epochs: int = 9, lr: float = LR, batches: int = 4):
    return resolve_schedule(name, cfg or {}, epochs=epochs, learning_rate=lr, batches_per_epoch=batches)


def test_registry_names_aliases_and_unknown_names() -> None:
    assert list_schedulers() == ["cosine", "step", "onecycle", "none"]
    assert resolve("one_cycle").name == "onecycle"
    assert resolve("OneCycle").name == "onecycle"
    assert resolve(None).name == "none"
    with pytest.raises(DlwatchdError) as caught:
        resolve("plateau")
    assert caught.value.code is ErrorCode.SCHEMA
    assert caught.value.field == "training.scheduler"
    assert all(name in caught.value.message for name in ("cosine", "step", "onecycle", "one_cycle", "none"))


def test_defaults_are_resolved_once_into_json_able_params() -> None:
    cosine = resolve("cosine", epochs=10)
    assert (cosine.params, cosine.step_per) == ({"T_0": 3, "T_mult": 2, "eta_min": 1e-6}, "epoch")
    assert resolve("cosine", epochs=2).params["T_0"] == 1
    assert resolve("cosine", {"T_0": 5, "T_mult": 1, "eta_min": 0.0}).params == {"T_0": 5, "T_mult": 1, "eta_min": 0.0}
    assert resolve("step", epochs=10).params == {"step_size": 3, "gamma": 0.1}
    assert resolve("step", epochs=2).params["step_size"] == 1
    assert resolve("step", {"step_size": 4, "gamma": 0.5}).params == {"step_size": 4, "gamma": 0.5}
    onecycle = resolve("onecycle", epochs=5, batches=7)
    assert onecycle.step_per == "batch"
    assert onecycle.params["max_lr"] == pytest.approx(10 * LR)
    assert onecycle.params["total_steps"] == 35
    assert resolve("onecycle", {"max_lr": 0.3}).params["max_lr"] == 0.3
    assert resolve("none") == ScheduleSpec("none", {}, "none")
    for spec in (cosine, onecycle):
        assert json.loads(json.dumps(spec.params)) == spec.params


def cosine_expected(epoch: int, base: float, t0: int, eta_min: float) -> float:
    """SGDR with T_mult 2, by hand: find the cycle holding `epoch`, then the cosine within it."""
    start, length = 0, t0
    while epoch >= start + length:
        start, length = start + length, length * 2
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * (epoch - start) / length)) / 2


def test_cosine_steps_per_epoch_with_explicit_epoch_numbers() -> None:
    spec = resolve("cosine", epochs=9)  # T_0 3, T_mult 2: cycles [0, 3), [3, 9), [9, 21)
    seen = epoch_lrs(spec, 12)
    expected = [cosine_expected(e, LR, 3, 1e-6) for e in range(12)]
    assert seen == pytest.approx(expected, rel=1e-9)
    assert seen[0] == LR and seen[3] == pytest.approx(LR) and seen[9] == pytest.approx(LR)


def test_cosine_is_stepped_with_the_next_epoch_number_and_the_others_without() -> None:
    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def step(self, *args) -> None:
            self.calls.append(args)

    cosine, step = Recorder(), Recorder()
    for epoch in range(3):
        step_epoch(cosine, resolve("cosine"), epoch)  # type: ignore[arg-type]
        step_epoch(step, resolve("step"), epoch)  # type: ignore[arg-type]
    assert cosine.calls == [(1,), (2,), (3,)]
    assert step.calls == [(), (), ()]


def test_step_schedule_with_few_epochs_decays_every_epoch_without_crashing() -> None:
    assert epoch_lrs(resolve("step", epochs=2), 2) == pytest.approx([LR, LR * 0.1])
    assert epoch_lrs(resolve("step", epochs=6), 6) == pytest.approx([LR, LR, LR * 0.1, LR * 0.1, LR * 0.01, LR * 0.01])


def test_onecycle_starts_at_four_tenths_of_lr_peaks_at_ten_times_and_ends_at_the_floor() -> None:
    spec = resolve("onecycle", epochs=5, batches=4)  # 20 steps, peak at step 0.3·20 − 1 = 5
    seen = batch_lrs(spec, 20)
    assert seen[0] == pytest.approx(0.4 * LR)
    assert max(seen) == pytest.approx(10 * LR) and seen.index(max(seen)) == 5
    assert seen[-1] == pytest.approx(0.4 * LR / 1e4)
    assert epoch_lrs(spec, 3) == pytest.approx([0.4 * LR] * 3)  # epoch stepping leaves a batch schedule alone


def test_none_keeps_the_lr_and_its_step_functions_do_nothing() -> None:
    spec = resolve("none")
    optimizer = make_optimizer()
    assert build_scheduler(spec, optimizer) is None
    step_epoch(None, spec, 0)
    step_batch(None, spec)
    assert epoch_lrs(spec, 3) == [LR] * 3


def resumed(spec: ScheduleSpec, advance, lr: float = LR, kind: str = "adam"):
    """Train with `advance`, then rebuild optimizer and scheduler from their states in the documented order."""
    optimizer = make_optimizer(lr, kind)
    scheduler = build_scheduler(spec, optimizer)
    advance(optimizer, scheduler)
    optimizer_state = optimizer.state_dict()
    scheduler_state = scheduler.state_dict() if scheduler is not None else None
    fresh = make_optimizer(lr, kind)
    fresh_scheduler = build_scheduler(spec, fresh)
    fresh.load_state_dict(optimizer_state)
    if fresh_scheduler is not None:
        fresh_scheduler.load_state_dict(scheduler_state)
    return fresh, fresh_scheduler, scheduler_state


def run_epochs(spec: ScheduleSpec, first: int, count: int):
    def advance(optimizer, scheduler) -> None:
        for epoch in range(first, first + count):
            optimizer_step(optimizer)
            step_epoch(scheduler, spec, epoch)

    return advance


@pytest.mark.parametrize("name", ["cosine", "step"])
def test_lr_override_after_loading_states_rebases_the_epoch_schedule_at_the_same_position(name: str) -> None:
    spec = resolve(name, epochs=9)
    new_lr = 0.2
    optimizer, scheduler, _ = resumed(spec, run_epochs(spec, 0, 4))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(epoch_lrs(spec, 5)[4])  # the order keeps the position
    spec = apply_learning_rate_override(optimizer, scheduler, spec, new_lr, {})
    seen = []
    for epoch in range(4, 9):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer)
        step_epoch(scheduler, spec, epoch)
    # The same epochs of a run that had used new_lr from the start.
    assert seen == pytest.approx(epoch_lrs(spec, 9, lr=new_lr)[4:], rel=1e-9)
    assert optimizer.param_groups[0]["initial_lr"] == new_lr and scheduler.base_lrs == [new_lr]


def test_lr_override_without_schedule_really_changes_the_sgd_update() -> None:
    spec = resolve("none")
    optimizer, scheduler, _ = resumed(spec, run_epochs(spec, 0, 2), kind="sgd")
    apply_learning_rate_override(optimizer, scheduler, spec, 0.5, {})
    parameter = optimizer.param_groups[0]["params"][0]
    before = parameter.detach().clone()
    optimizer_step(optimizer)  # d/dp Σp² = 2p, so plain SGD moves p by −lr·2p
    torch.testing.assert_close(parameter.detach(), before - 0.5 * 2 * before)


def run_batches(spec: ScheduleSpec, count: int):
    def advance(optimizer, scheduler) -> None:
        for _ in range(count):
            optimizer_step(optimizer)
            step_batch(scheduler, spec)

    return advance


def test_onecycle_lr_override_keeps_the_position_with_ten_times_the_new_lr_as_peak() -> None:
    original = resolve("onecycle", epochs=5, batches=4)
    new_lr = 0.002
    optimizer, scheduler, _ = resumed(original, run_batches(original, 7))
    spec = apply_learning_rate_override(optimizer, scheduler, original, new_lr, {})
    assert spec.params["max_lr"] == pytest.approx(10 * new_lr)
    assert original.params["max_lr"] == pytest.approx(10 * LR)  # the caller's spec is not mutated
    seen = []
    for _ in range(13):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer)
        step_batch(scheduler, spec)
    # The steps 7… of a run resolved with new_lr from the start, not those of the original schedule.
    assert seen == pytest.approx(batch_lrs(resolve("onecycle", epochs=5, batches=4, lr=new_lr), 20)[7:], rel=1e-9)
    assert seen != pytest.approx(batch_lrs(original, 20)[7:])


def test_onecycle_lr_override_leaves_an_explicit_max_lr_alone() -> None:
    spec = resolve("onecycle", {"max_lr": 0.05}, epochs=5, batches=4)
    optimizer, scheduler, _ = resumed(spec, run_batches(spec, 7))
    before = optimizer.param_groups[0]["lr"]
    assert apply_learning_rate_override(optimizer, scheduler, spec, 0.9, {"max_lr": 0.05}) == spec
    assert optimizer.param_groups[0]["lr"] == before


def momentum_and_lr(optimizer: torch.optim.Optimizer) -> list[float]:
    group = optimizer.param_groups[0]
    return [group["lr"], group["betas"][0]]


def test_onecycle_rebuild_fast_forward_equals_the_uninterrupted_schedule() -> None:
    spec = resolve("onecycle", epochs=5, batches=4)
    reference = make_optimizer()
    reference_scheduler = build_scheduler(spec, reference)
    expected = []
    for _ in range(20):
        expected.extend(momentum_and_lr(reference))
        optimizer_step(reference)
        step_batch(reference_scheduler, spec)

    optimizer, _, _ = resumed(spec, run_batches(spec, 8))
    scheduler, rebuilt = rebuild_onecycle(
        optimizer, spec, steps_done=8, epochs=3, batches_per_epoch=4, scheduler_state=None
    )
    assert rebuilt.params["total_steps"] == 20
    seen = []
    for _ in range(12):
        seen.extend(momentum_and_lr(optimizer))
        optimizer_step(optimizer)
        step_batch(scheduler, rebuilt)
    assert seen == pytest.approx(expected[16:], rel=1e-12)


def test_onecycle_rebuild_loads_the_saved_state_when_nothing_changed() -> None:
    spec = resolve("onecycle", epochs=5, batches=4)
    optimizer, _, state = resumed(spec, run_batches(spec, 6))
    scheduler, rebuilt = rebuild_onecycle(
        optimizer,
        spec,
        steps_done=6,
        epochs=4,  # resumes in epoch 1 of 5, two of its four batches done
        batches_per_epoch=4,
        scheduler_state=state,
        batch_in_epoch=2,
    )
    assert rebuilt == spec
    assert scheduler.state_dict()["_step_count"] == state["_step_count"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(batch_lrs(spec, 7)[6])


def test_onecycle_rebuild_with_more_epochs_and_batches_spans_the_new_total() -> None:
    spec = resolve("onecycle", epochs=5, batches=4)
    optimizer, _, state = resumed(spec, run_batches(spec, 8))
    scheduler, rebuilt = rebuild_onecycle(
        optimizer, spec, steps_done=8, epochs=4, batches_per_epoch=6, scheduler_state=state
    )
    assert rebuilt.params["total_steps"] == 8 + 4 * 6
    assert spec.params["total_steps"] == 20  # the caller's spec is not mutated
    fresh = batch_lrs(rebuilt, 32)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(fresh[8])
    seen = []
    for _ in range(24):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer_step(optimizer)
        step_batch(scheduler, rebuilt)
    assert seen == pytest.approx(fresh[8:])
    assert seen[-1] == pytest.approx(0.4 * LR / 1e4)


def test_onecycle_rebuild_refuses_other_schedules_and_an_empty_remainder() -> None:
    optimizer = make_optimizer()
    with pytest.raises(ValueError):
        rebuild_onecycle(
            optimizer,
            resolve("cosine"),
            steps_done=1,
            epochs=2,
            batches_per_epoch=2,
            scheduler_state=None,
        )
    with pytest.raises(ValueError):
        rebuild_onecycle(
            optimizer,
            resolve("onecycle"),
            steps_done=8,
            epochs=0,
            batches_per_epoch=4,
            scheduler_state=None,
        )


def test_onecycle_rebuild_and_lr_override_commute() -> None:
    spec = resolve("onecycle", epochs=5, batches=4)
    results = []
    for rebuild_first in (True, False):
        optimizer, scheduler, _ = resumed(spec, run_batches(spec, 9))
        current = spec
        for action in ("rebuild", "override") if rebuild_first else ("override", "rebuild"):
            if action == "rebuild":
                scheduler, current = rebuild_onecycle(
                    optimizer,
                    current,
                    steps_done=9,
                    epochs=4,
                    batches_per_epoch=5,
                    scheduler_state=None,
                    batch_in_epoch=1,
                )
            else:
                current = apply_learning_rate_override(optimizer, scheduler, current, 0.003, {})
        seen = []
        for _ in range(5):
            seen.extend(momentum_and_lr(optimizer))
            optimizer_step(optimizer)
            step_batch(scheduler, current)
        results.append((seen, current.params))
    assert results[0][1] == results[1][1]
    assert results[0][1]["total_steps"] == 9 + 4 * 5 - 1 and results[0][1]["max_lr"] == pytest.approx(0.03)
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-12)
