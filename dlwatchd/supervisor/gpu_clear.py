"""gpu-clear (ENGINE.md section 13.3): measure, cancel trainings, recycle the workers, measure again.

Recycling the worker processes is what frees device memory for certain (CUDA contexts, ONNX Runtime
arenas and cached models go with the process), instead of hoping a cache flush does it. The operation
spans many loop turns, so it is a small state machine the supervisor advances.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlwatchd.errors import ErrorCode
from dlwatchd.protocol.status import JobState
from dlwatchd.spool import control
from dlwatchd.spool.claims import commit_terminal
from dlwatchd.spool.joblog import append_job_log
from dlwatchd.spool.recovery import reconcile
from dlwatchd.spool.status_file import StatusFile

if TYPE_CHECKING:
    from dlwatchd.supervisor.daemon import Supervisor

logger = logging.getLogger("dlwatchd.gpu_clear")

DRAIN_TIMEOUT_S = 30.0
MEASURE_TIMEOUT_S = 60.0
_SUMMED = ("allocated_mb", "reserved_mb")


def combine_memory(reply: dict[str, Any] | None, others: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The memory object of the whole daemon: the query worker's figures plus the other workers' allocations."""
    if reply is None:
        return {"device": "unknown", "error": "the query worker did not report memory in time"}
    if reply.get("device") != "cuda" or "error" in reply:
        return dict(reply)
    combined = dict(reply)
    for snapshot in others:
        if snapshot and snapshot.get("device") == "cuda":
            for key in _SUMMED:
                combined[key] = round(combined.get(key, 0.0) + snapshot.get(key, 0.0), 1)
            combined["max_allocated_mb"] = max(
                combined.get("max_allocated_mb", 0.0), snapshot.get("max_allocated_mb", 0.0)
            )
    total = combined.get("total_mb") or 0
    combined["utilization_percent"] = round(100.0 * combined.get("allocated_mb", 0.0) / total, 1) if total else 0.0
    return combined


class GpuClear:
    """One gpu-clear request in progress; `advance()` returns True once its status is final."""

    def __init__(self, supervisor: Supervisor, job_id: str, claim: Path) -> None:
        self.sup = supervisor
        self.job_id = job_id
        self.claim = claim
        self.phase = "before"
        self.deadline = time.monotonic() + MEASURE_TIMEOUT_S
        self.asked = False
        self.reply: dict[str, Any] | None = None
        self.replied = False
        self.memory_before: dict[str, Any] = {}
        self.cancelled: list[str] = []
        self.cleared_models = 0

    def holds(self, lane: str) -> bool:
        """True while `lane` must not start new jobs."""
        return lane != "query" or self.phase in ("before", "recycle", "after")

    def on_memory(self, lane: str, memory: dict[str, Any] | None) -> None:
        if lane == "query":
            self.reply, self.replied = memory, True

    def advance(self) -> bool:
        if self.phase == "before" and self._measured():
            others = [lane.memory for name, lane in self.sup.lanes.items() if name != "query"]
            self.memory_before = combine_memory(self.reply, others)
            self.cleared_models = sum(
                int((lane.memory or {}).get("cached_models", 0)) for lane in self.sup.lanes.values()
            )
            self._cancel_trainings()
            self.phase, self.deadline = "drain", time.monotonic() + DRAIN_TIMEOUT_S
        if self.phase == "drain":
            lanes = self.sup.lanes
            if (not lanes["train"].jobs and not lanes["infer"].jobs) or time.monotonic() > self.deadline:
                self.phase = "recycle"
        if self.phase == "recycle":
            self._recycle()
            self.phase, self.deadline, self.asked, self.replied = (
                "after",
                time.monotonic() + MEASURE_TIMEOUT_S,
                False,
                False,
            )
            self.reply = None
        if self.phase == "after" and self._measured():
            self._finish(combine_memory(self.reply, []))
            return True
        return False

    def _measured(self) -> bool:
        """Ask the query worker for memory figures once it is idle; True when answered or timed out."""
        lane = self.sup.lanes["query"]
        if not self.asked and lane.idle and lane.conn is not None:
            lane.conn.send({"op": "memory"})
            self.asked = True
        return self.replied or time.monotonic() > self.deadline

    def _is_training(self, job_id: str) -> bool:
        kind = self.sup.kind_of(job_id)
        return kind is not None and kind in self.sup.registry and self.sup.registry.get(kind).lane == "train"

    def _cancel_trainings(self) -> None:
        """Cancel the train lane's jobs: queued and paused ones at once, the running one at its next batch."""
        sup, layout = self.sup, self.sup.layout
        for job_id in list(sup.queue):
            if self._is_training(job_id):
                layout.marker_path(job_id, "cancel").touch()
                if control.cancel_queued(layout, job_id, sup.me):
                    self.cancelled.append(job_id)
        for job_id in list(sup.paused):
            if self._is_training(job_id):
                layout.marker_path(job_id, "cancel").touch()
                if control.settle_paused(layout, job_id, sup.me) == "cancelled":
                    sup.paused.discard(job_id)
                    self.cancelled.append(job_id)
        for running in sup.lanes["train"].jobs:  # one in a local worker, any number on Slurm
            layout.marker_path(running.job_id, "cancel").touch()
            self.cancelled.append(running.job_id)
        sup.refresh_queue()

    def _recycle(self) -> None:
        sup = self.sup
        for lane in sup.lanes.values():
            for job in lane.stop(timeout=5.0):
                reconcile(sup.layout, sup.registry, job.job_id, Path(job.claim), sup.me, ErrorCode.INTERRUPTED)
            lane.memory = None
            lane.start()
        self.sup.refresh_queue()

    def _finish(self, memory_after: dict[str, Any]) -> None:
        result: dict[str, Any] = {
            "status": "cleared",
            "cancelled_jobs": self.cancelled,
            "memory_before": self.memory_before,
            "memory_after": memory_after,
            "cleared_models": self.cleared_models,
            "recycled_workers": len(self.sup.lanes),
        }
        if self.memory_before.get("device") == "cuda" and memory_after.get("device") == "cuda":
            before = float(self.memory_before.get("allocated_mb", 0.0))
            result["freed_mb"] = round(before - float(memory_after.get("allocated_mb", 0.0)), 1)
        StatusFile(self.sup.layout.status_path(self.job_id)).update(state=JobState.SUCCEEDED, result=result)
        append_job_log(self.sup.layout.log_path(self.job_id), f"gpu-clear done; cancelled {self.cancelled}")
        commit_terminal(self.sup.layout, self.claim, self.job_id, "succeeded")
        self.sup.counters.completed += 1
        logger.info("gpu-clear %s: cancelled %s", self.job_id, self.cancelled)
