"""Learning-rate schedules (ENGINE §8.3) filled by `register_scheduler`, and their resume rules (§10.4).

A schedule is resolved once into a `ScheduleSpec` whose params are stored in the checkpoint and the metadata, so a
resume never recomputes `T_0` and friends from a changed `epochs`.

Resume order the helpers assume (torch's own rule: a scheduler's constructor overwrites the groups' lr): build the
optimizer, `build_scheduler`, load the optimizer state, load the scheduler state, then `apply_learning_rate_override`
and, for OneCycle when epochs or batches per epoch changed, `rebuild_onecycle` (those two commute).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts, LRScheduler, OneCycleLR, StepLR

from dlwatchd.errors import DlwatchdError, ErrorCode


@dataclass
class ScheduleSpec:
    """A resolved schedule: canonical name, every constructor argument, and when it steps."""

    name: str
    params: dict[str, Any]
    step_per: str  # "epoch" | "batch" | "none"


@dataclass(frozen=True)
class SchedulerEntry:
    """One registered schedule.

    `resolve(cfg, epochs, learning_rate, batches_per_epoch)` returns the params; `build(optimizer, params)` the torch
    scheduler (None for no schedule); `rebase(optimizer, scheduler, spec, new_lr, cfg)` applies a new base lr at the
    current position and returns the updated spec.
    """

    name: str
    step_per: str
    resolve: Callable[[dict[str, Any], int, float, int], dict[str, Any]]
    build: Callable[[torch.optim.Optimizer, dict[str, Any]], LRScheduler | None]
    rebase: Callable[..., ScheduleSpec]
    aliases: tuple[str, ...] = ()


_SCHEDULERS: dict[str, SchedulerEntry] = {}
_LOOKUP: dict[str, str] = {}


def register_scheduler(entry: SchedulerEntry) -> SchedulerEntry:
    """Add `entry`; raises ValueError when its name or an alias is taken."""
    keys = [entry.name, *entry.aliases]
    taken = [key for key in keys if key in _LOOKUP]
    if taken:
        raise ValueError(f"scheduler name(s) {', '.join(taken)} already registered")
    _SCHEDULERS[entry.name] = entry
    _LOOKUP.update(dict.fromkeys(keys, entry.name))
    return entry


def list_schedulers(pattern: str = "*") -> list[str]:
    """Registered canonical scheduler names matching the fnmatch `pattern`, in registration order."""
    return [name for name in _SCHEDULERS if fnmatch.fnmatchcase(name, pattern)]


def _entry(name: str | None) -> SchedulerEntry:
    key = "none" if name is None else name.strip().lower()
    canonical = _LOOKUP.get(key)
    if canonical is None:
        accepted = ", ".join(_LOOKUP)
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Unknown scheduler {name!r}; valid names are: {accepted}.",
            field="training.scheduler",
        )
    return _SCHEDULERS[canonical]


def _config(cfg: dict[str, Any], key: str, default: Any) -> Any:
    # Absent or null means the default; an explicit 0 (eta_min) is a value, which Python's `or` would lose.
    value = cfg.get(key)
    return default if value is None else value


def resolve_schedule(
    name: str | None, cfg: dict[str, Any], *, epochs: int, learning_rate: float, batches_per_epoch: int
) -> ScheduleSpec:
    """Resolve `name` (any case; `one_cycle` → `onecycle`; None → `none`) and `cfg` defaults into a ScheduleSpec.

    Raises DlwatchdError(E_SCHEMA, field "training.scheduler") listing the valid names for an unknown one.
    """
    entry = _entry(name)
    params = entry.resolve(cfg or {}, epochs, learning_rate, batches_per_epoch)
    return ScheduleSpec(name=entry.name, params=params, step_per=entry.step_per)


def build_scheduler(spec: ScheduleSpec, optimizer: torch.optim.Optimizer) -> LRScheduler | None:
    """The torch scheduler for `spec` over `optimizer` (None for `none`); sets the groups' lr to the schedule start."""
    return _entry(spec.name).build(optimizer, spec.params)


def step_epoch(scheduler: LRScheduler | None, spec: ScheduleSpec, epoch_index: int) -> None:
    """Advance an epoch-based schedule after validation of the 0-based `epoch_index`; no-op for the others."""
    if scheduler is None or spec.step_per != "epoch":
        return
    if spec.name == "cosine":
        # The reference passes the epoch explicitly; CosineAnnealingWarmRestarts then uses its closed form.
        scheduler.step(epoch_index + 1)
    else:
        scheduler.step()


def step_batch(scheduler: LRScheduler | None, spec: ScheduleSpec) -> None:
    """Advance a batch-based schedule (OneCycle) after an optimizer step; no-op for the others."""
    if scheduler is not None and spec.step_per == "batch":
        scheduler.step()


def apply_learning_rate_override(
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    spec: ScheduleSpec,
    new_lr: float,
    cfg: dict[str, Any],
) -> ScheduleSpec:
    """Make `new_lr` the base of the schedule, keeping its position (§10.4); returns the updated spec.

    Call after both optimizer and scheduler states are loaded (loading either would undo this). Every group's lr
    becomes the schedule's value at the current position under the new base (exactly `new_lr` without a schedule);
    `initial_lr` and the scheduler's `base_lrs` follow. OneCycle: `max_lr` becomes 10 × `new_lr` unless `cfg` sets it.
    """
    return _entry(spec.name).rebase(optimizer, scheduler, spec, float(new_lr), cfg or {})


def rebuild_onecycle(
    optimizer: torch.optim.Optimizer,
    spec: ScheduleSpec,
    *,
    steps_done: int,
    epochs: int,
    batches_per_epoch: int,
    scheduler_state: dict[str, Any] | None,
    batch_in_epoch: int = 0,
) -> tuple[OneCycleLR, ScheduleSpec]:
    """A OneCycleLR over `steps_done` + the remaining steps, positioned at `steps_done` (§10.4).

    `epochs` counts the epochs still to run, the resumed one included (new total − 0-based resume epoch);
    `batch_in_epoch` the batches of that epoch already done when it continues mid-epoch (0 when it restarts, and
    then those abandoned steps stay in `steps_done`, as the optimizer really took them). When `scheduler_state`
    describes exactly this total and position it is loaded as is; otherwise the schedule is rebuilt and fast-forwarded.
    Raises ValueError for a non-OneCycle spec or when no step remains.
    """
    if spec.name != "onecycle":
        raise ValueError(f"rebuild_onecycle needs a onecycle schedule, not {spec.name!r}")
    remaining = epochs * batches_per_epoch - batch_in_epoch
    if remaining < 1 or steps_done < 0:
        raise ValueError(f"no OneCycle step left: {steps_done} done, {remaining} remaining")
    total = steps_done + remaining
    new_spec = dataclasses.replace(spec, params={**spec.params, "total_steps": total})
    scheduler = _build_onecycle(optimizer, new_spec.params)
    state = scheduler_state or {}
    if state.get("total_steps") == total and state.get("last_epoch") == steps_done:
        scheduler.load_state_dict(state)
        # The saved base_lrs predate any lr override; OneCycle's own lr math reads the groups, which are current.
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    else:
        scheduler.last_epoch = steps_done
    # The constructor reset lr and beta1 to the cycle start; put both at the position's values.
    _reapply(scheduler, scheduler.get_lr)
    return scheduler, new_spec


def _reapply(scheduler: LRScheduler, compute: Callable[[], list[Any]]) -> None:
    """Write the lrs `compute` gives for the scheduler's current position into the groups and `_last_lr`."""
    # get_lr() outside step() only warns that get_last_lr() exists; here the recomputation is the point.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        values = compute()
    for group, lr in zip(scheduler.optimizer.param_groups, values, strict=True):
        group["lr"] = lr
    # _last_lr is what get_last_lr() reports; torch updates it only inside step().
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _set_base(optimizer: torch.optim.Optimizer, scheduler: LRScheduler | None, base: float) -> None:
    for group in optimizer.param_groups:
        group["initial_lr"] = base
    if scheduler is not None:
        scheduler.base_lrs = [base] * len(optimizer.param_groups)


# --- cosine -------------------------------------------------------------------------------------------------------


def _resolve_cosine(cfg: dict[str, Any], epochs: int, learning_rate: float, batches_per_epoch: int) -> dict[str, Any]:
    return {
        "T_0": int(_config(cfg, "T_0", max(epochs // 3, 1))),
        "T_mult": int(_config(cfg, "T_mult", 2)),
        "eta_min": float(_config(cfg, "eta_min", 1e-6)),
    }


def _build_cosine(optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> LRScheduler:
    return CosineAnnealingWarmRestarts(optimizer, T_0=params["T_0"], T_mult=params["T_mult"], eta_min=params["eta_min"])


def _rebase_cosine(optimizer, scheduler, spec: ScheduleSpec, new_lr: float, cfg: dict[str, Any]) -> ScheduleSpec:
    _set_base(optimizer, scheduler, new_lr)
    _reapply(scheduler, scheduler.get_lr)  # closed form over T_cur / T_i and the new base_lrs
    return spec


# --- step ---------------------------------------------------------------------------------------------------------


def _resolve_step(cfg: dict[str, Any], epochs: int, learning_rate: float, batches_per_epoch: int) -> dict[str, Any]:
    # The reference used epochs // 3 unclamped: 0 for epochs < 3, and StepLR crashed (defect 3).
    return {
        "step_size": max(int(_config(cfg, "step_size", epochs // 3)), 1),
        "gamma": float(_config(cfg, "gamma", 0.1)),
    }


def _build_step(optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> LRScheduler:
    return StepLR(optimizer, step_size=params["step_size"], gamma=params["gamma"])


def _rebase_step(optimizer, scheduler, spec: ScheduleSpec, new_lr: float, cfg: dict[str, Any]) -> ScheduleSpec:
    _set_base(optimizer, scheduler, new_lr)
    # StepLR.get_lr() is chained off the current group lr, so the position's value comes from the closed form.
    decays = scheduler.last_epoch // scheduler.step_size
    _reapply(scheduler, lambda: [base * scheduler.gamma**decays for base in scheduler.base_lrs])
    return spec


# --- onecycle -----------------------------------------------------------------------------------------------------


def _resolve_onecycle(cfg: dict[str, Any], epochs: int, learning_rate: float, batches_per_epoch: int) -> dict[str, Any]:
    if epochs < 1 or batches_per_epoch < 1:
        raise ValueError(f"OneCycle needs at least one step, not {epochs} epochs × {batches_per_epoch} batches")
    return {
        "max_lr": float(_config(cfg, "max_lr", 10.0 * learning_rate)),
        "total_steps": epochs * batches_per_epoch,
        "pct_start": 0.3,
        "anneal_strategy": "cos",
        "div_factor": 25.0,
        "final_div_factor": 1e4,
    }


def _build_onecycle(optimizer: torch.optim.Optimizer, params: dict[str, Any]) -> OneCycleLR:
    return OneCycleLR(
        optimizer,
        max_lr=params["max_lr"],
        total_steps=params["total_steps"],
        pct_start=params["pct_start"],
        anneal_strategy=params["anneal_strategy"],
        div_factor=params["div_factor"],
        final_div_factor=params["final_div_factor"],
    )


def _rebase_onecycle(optimizer, scheduler, spec: ScheduleSpec, new_lr: float, cfg: dict[str, Any]) -> ScheduleSpec:
    if cfg.get("max_lr") is not None:
        return spec  # an explicit max_lr fixes the whole cycle; the base lr plays no part in it
    params = {**spec.params, "max_lr": 10.0 * new_lr}
    initial = params["max_lr"] / params["div_factor"]
    for group in optimizer.param_groups:
        group["max_lr"] = params["max_lr"]
        group["initial_lr"] = initial
        group["min_lr"] = initial / params["final_div_factor"]
    if scheduler is not None:
        scheduler.base_lrs = [initial] * len(optimizer.param_groups)
        _reapply(scheduler, scheduler.get_lr)  # closed form from the groups' max/initial/min lr at last_epoch
    return dataclasses.replace(spec, params=params)


# --- none ---------------------------------------------------------------------------------------------------------


def _rebase_none(optimizer, scheduler, spec: ScheduleSpec, new_lr: float, cfg: dict[str, Any]) -> ScheduleSpec:
    for group in optimizer.param_groups:
        group["lr"] = new_lr
        if "initial_lr" in group:
            group["initial_lr"] = new_lr
    return spec


register_scheduler(SchedulerEntry("cosine", "epoch", _resolve_cosine, _build_cosine, _rebase_cosine))
register_scheduler(SchedulerEntry("step", "epoch", _resolve_step, _build_step, _rebase_step))
register_scheduler(
    SchedulerEntry("onecycle", "batch", _resolve_onecycle, _build_onecycle, _rebase_onecycle, aliases=("one_cycle",))
)
register_scheduler(SchedulerEntry("none", "none", lambda *_: {}, lambda *_: None, _rebase_none))
