"""Best-epoch selection and early stopping (ENGINE §8.5), with a JSON-able state for checkpoints (§10.3)."""

from __future__ import annotations

import math
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode

# Monitored metric -> the direction that counts as better.
MONITOR_MODES = {"val_loss": "min", "mean_iou": "max"}


class EarlyStopping:
    """Tracks the best epoch of one monitored metric and decides when training stops.

    Enabled: an epoch improves when its value beats the best by more than `min_delta` (the first finite value always
    does); otherwise the counter grows and `should_stop` turns True at `patience`. Disabled: the best is the strict
    optimum, earliest on ties, and it never stops. Non-finite values (None, NaN, ±inf) never improve.
    Raises DlwatchdError(E_SCHEMA, field "training.early_stopping_metric") for an unknown monitor.
    """

    def __init__(
        self, *, monitor: str = "val_loss", patience: int = 10, min_delta: float = 0.001, enabled: bool = True
    ) -> None:
        if monitor not in MONITOR_MODES:
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                f"Unknown early-stopping metric {monitor!r}; valid names are: {', '.join(MONITOR_MODES)}.",
                field="training.early_stopping_metric",
            )
        self.monitor = monitor
        self.mode = MONITOR_MODES[monitor]
        self.patience = patience
        self.min_delta = min_delta
        self.enabled = enabled
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.counter = 0
        self.should_stop = False

    def _improves(self, value: float) -> bool:
        if self.best_value is None:
            return True
        # Disabled mode selects the strict optimum, so the tolerance only applies while it can stop training.
        delta = self.min_delta if self.enabled else 0.0
        if self.mode == "min":
            return value < self.best_value - delta
        return value > self.best_value + delta

    def update(self, epoch: int, value: float | None) -> bool:
        """Account for `epoch` (0-based in the engine) with `value`; True when it is the new best."""
        if value is not None and math.isfinite(value) and self._improves(float(value)):
            self.best_value = float(value)
            self.best_epoch = epoch
            self.counter = 0
            return True
        self.counter += 1
        self.should_stop = self.enabled and self.counter >= self.patience
        return False

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state; holds the checkpoint keys best_value, best_epoch, counter, monitor, mode."""
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "counter": self.counter,
            "monitor": self.monitor,
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "enabled": self.enabled,
            "should_stop": self.should_stop,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the progress of `state_dict()`; the configuration (patience, min_delta, enabled) stays this object's.

        Raises ValueError when `state` monitors another metric.
        """
        if state.get("monitor", self.monitor) != self.monitor:
            raise ValueError(f"early-stopping state monitors {state['monitor']!r}, not {self.monitor!r}")
        best_value = state.get("best_value")
        best_epoch = state.get("best_epoch")
        self.best_value = None if best_value is None else float(best_value)
        self.best_epoch = None if best_epoch is None else int(best_epoch)
        self.counter = int(state.get("counter", 0))
        # Derived rather than copied, so it always agrees with this object's patience and enabled flag.
        self.should_stop = self.enabled and self.counter >= self.patience
