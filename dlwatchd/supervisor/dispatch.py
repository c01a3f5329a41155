"""Dispatch: queued jobs to idle lanes, claimed first; kinds without a lane are answered by the supervisor itself."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlwatchd.jobs.runner import run_job
from dlwatchd.protocol.status import JobState
from dlwatchd.spool.claims import claim_queued, commit_terminal
from dlwatchd.spool.status_file import StatusFile, read_status
from dlwatchd.supervisor.gpu_clear import GpuClear
from dlwatchd.supervisor.lanes import RunningJob

if TYPE_CHECKING:
    from dlwatchd.supervisor.daemon import Supervisor

# Inference requests on one model run together up to these limits, so several clients' single tiles
# share one forward pass without making any one request wait long.
_MAX_GROUP_JOBS = 8
_MAX_GROUP_TILES = 64


def dispatch(sup: Supervisor) -> None:
    """Hand queued jobs to idle lanes (claiming each first) and answer supervisor-run kinds at once."""
    if sup.stop_requested or (sup.reason and sup.reason.startswith("spool folders")):
        return
    for job_id in list(sup.queue):
        kind_name = sup.kind_of(job_id)
        if kind_name is None or kind_name not in sup.registry:
            continue
        kind = sup.registry.get(kind_name)
        if kind.lane is None:
            if kind_name == "gpu-clear" and sup.gpu_clear is not None:
                continue
            claim = claim_queued(sup.layout, job_id, sup.me)
            sup.queue.remove(job_id)
            if claim is not None:
                _answer_locally(sup, job_id, kind_name, claim)
            continue
        lane = sup.lanes[kind.lane]
        if not lane.idle or (sup.gpu_clear is not None and sup.gpu_clear.holds(kind.lane)):
            continue
        claim = claim_queued(sup.layout, job_id, sup.me)
        sup.queue.remove(job_id)
        if claim is None:
            continue  # another daemon was faster
        group = [(job_id, claim)]
        if kind.group_handler is not None and lane.groups:
            group += _claim_group(sup, job_id, kind_name)
        messages = [job_message(sup, member, kind_name, path, lane.name) for member, path in group]
        lane.run(messages, [RunningJob(m["job_id"], kind_name, m["claim"], m["attempt"]) for m in messages])


def _claim_group(sup: Supervisor, first: str, kind: str) -> list[tuple[str, Path]]:
    """Claim queued jobs that can run with `first` in one go (same kind and batch key), within limits."""
    key = sup.batch_keys.get(first)
    if key is None:
        return []
    tiles = key[1]
    group: list[tuple[str, Path]] = []
    for job_id in list(sup.queue):
        other = sup.batch_keys.get(job_id)
        if len(group) + 1 >= _MAX_GROUP_JOBS or tiles >= _MAX_GROUP_TILES:
            break
        if other is None or other[0] != key[0] or sup.kind_of(job_id) != kind:
            continue
        claim = claim_queued(sup.layout, job_id, sup.me)
        sup.queue.remove(job_id)
        if claim is not None:
            group.append((job_id, claim))
            tiles += other[1]
    return group


def job_message(sup: Supervisor, job_id: str, kind: str, claim: Path, lane: str) -> dict[str, Any]:
    """Everything a runner needs to run one claimed job (it crosses the pipe to a worker)."""
    status = read_status(sup.layout.status_path(job_id))
    return {
        "spool": str(sup.layout.root),
        "job_id": job_id,
        "kind": kind,
        "claim": str(claim),
        "daemon": sup.me,
        "attempt": status.attempt if status else 1,
        "lane": lane,
        "read_roots": [str(p) for p in sup.settings.effective_read_roots()],
        "write_roots": [str(p) for p in sup.settings.effective_write_roots()],
        "weights_dir": str(sup.settings.weights_dir),
        "model_dirs": [str(p) for p in sup.settings.effective_model_dirs()],
    }


def _answer_locally(sup: Supervisor, job_id: str, kind: str, claim: Path) -> None:
    """Kinds the supervisor answers itself: pure catalogue handlers, health, and gpu-clear over many turns."""
    if sup.registry.get(kind).handler is not None:
        state = run_job(job_message(sup, job_id, kind, claim, "supervisor"), sup.registry, lambda message: None)
        sup._finish(RunningJob(job_id, kind, str(claim), 1), state)
        return
    writer = StatusFile(sup.layout.status_path(job_id))
    writer.update(state=JobState.RUNNING, daemon=sup.me)
    if kind == "gpu-clear":
        sup.gpu_clear = GpuClear(sup, job_id, claim)
        return
    writer.update(state=JobState.SUCCEEDED, result=sup.health().model_dump(mode="json"))
    commit_terminal(sup.layout, claim, job_id, "succeeded")
    sup.counters.completed += 1
    sup.forget(job_id)
