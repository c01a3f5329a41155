"""The slurm executor against a real single-node Slurm: the spool protocol unchanged, jobs run by `exec-job`."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dlwatchd.client import SpoolClient, read_probabilities
from dlwatchd.slurm.ticket import read_ticket
from dlwatchd.spool.layout import SpoolLayout
from dlwatchd.synth import SynthSpec, write_dataset

_E2E = Path(__file__).resolve().parents[1] / "e2e"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


e2e = _load("dlwatchd_e2e_harness", _E2E / "conftest.py")
Daemon, wait_for, wait_state, epoch_of = e2e.Daemon, e2e.wait_for, e2e.wait_state, e2e.epoch_of

TERMINAL = {"succeeded", "failed", "cancelled", "rejected"}


def config(tmp_path: Path, **slurm: Any) -> Path:
    """A config file selecting the slurm executor with `slurm` settings ({"train": {...}} for lane tables)."""
    lines = ['executor = "slurm"', "", "[slurm]", "poll_interval = 0.5"]
    tables = {key: value for key, value in slurm.items() if isinstance(value, dict)}
    lines += [f"{key} = {json.dumps(value)}" for key, value in slurm.items() if key not in tables]
    for table, values in tables.items():
        lines += ["", f"[slurm.{table}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    path = tmp_path / f"slurm-{len(list(tmp_path.glob('slurm-*.toml')))}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def start_daemon(slurm_cluster: Any, tmp_path: Path) -> Any:
    made: list[Any] = []

    def start(spool: Path, daemon_id: str = "slurm-1", env: dict[str, str] | None = None, **slurm: Any) -> Any:
        daemon = Daemon(spool, daemon_id, "native", ("--config", str(config(tmp_path, **slurm))))
        daemon.env = {**slurm_cluster.env, **(env or {})}
        made.append(daemon)
        return daemon.start()

    yield start
    for daemon in made:
        try:
            daemon.stop()
        except Exception:
            daemon.kill()


def dataset(spool: Path, name: str, train: int = 6) -> Path:
    root = spool / "inputs" / name
    write_dataset(root, SynthSpec(train=train, validation=3, size=64, seed=3))
    return root


def train_request(data: Path, **training: Any) -> dict[str, Any]:
    classes = json.loads((data / "config.json").read_text())["classes"]
    return {
        "kind": "train",
        "model_type": "unet",
        "architecture": {"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False},
        "input_config": {"num_channels": 3, "bit_depth": 8},
        "classes": [c["name"] for c in classes],
        "training": {
            "epochs": 2,
            "batch_size": 3,
            "learning_rate": 0.003,
            "seed": 11,
            "scheduler": "none",
            "export_int8": False,
            **training,
        },  # fmt: skip
        "data_path": str(data),
    }


def slurm_id(spool: Path, job_id: str) -> str:
    ticket = wait_for(lambda: (t := read_ticket(SpoolLayout(spool), job_id)) and t.slurm_job_id and t, timeout=60)
    return str(ticket.slurm_job_id)


def infer_pixel(client: SpoolClient, spool: Path, model_id: str) -> dict[str, np.ndarray]:
    tiles = sorted((spool / "inputs" / "data" / "validation" / "images").iterdir())
    request = {"kind": "infer-pixel", "model_id": model_id, "tiles": [{"id": t.stem, "data": str(t)} for t in tiles]}
    status = wait_state(client, client.submit(request), TERMINAL, 180)
    assert status.state.value == "succeeded", status.error
    result = status.result
    return {
        tile: read_probabilities(Path(path), *result["shape"][tile]) for tile, path in result["output_paths"].items()
    }


def test_training_and_infer_pixel_on_slurm_equal_the_local_executor(start_daemon: Any, tmp_path: Path) -> None:
    """The same seeded training and the same infer-pixel request give the same numbers on Slurm as in a local
    worker: the executor changes where a job runs, not what it computes."""
    results = {}
    for executor in ("local", "slurm"):
        spool = tmp_path / executor
        data = dataset(spool, "data")
        daemon = Daemon(spool, "local-1").start() if executor == "local" else start_daemon(spool)
        client = SpoolClient(spool)
        try:
            job = client.submit(train_request(data))
            status = wait_state(client, job, TERMINAL, 300)
            assert status.state.value == "succeeded", status.error
            maps = infer_pixel(client, spool, status.result["model_id"])
        finally:
            daemon.stop()
        model_dir = Path(status.result["model_path"])
        for name in ("model.pt", "model.onnx", "metadata.json", "training_history.json", "training_report.png"):
            assert (model_dir / name).exists(), name
        history = json.loads((model_dir / "training_history.json").read_text())
        results[executor] = (status.result, history, maps)
        if executor == "slurm":
            ticket = read_ticket(SpoolLayout(spool), job)
            assert ticket is not None and ticket.slurm_job_id is not None
            assert (spool / "jobs" / job / f"slurm-{ticket.slurm_job_id}.out").exists()
            assert "submitted to Slurm as job" in (spool / "jobs" / job / "log.txt").read_text()
    (local, local_history, local_maps), (slurm, slurm_history, slurm_maps) = results["local"], results["slurm"]
    for key in ("final_loss", "final_accuracy", "best_epoch", "epochs_trained", "mean_iou", "per_class_iou"):
        assert slurm[key] == local[key], key
    assert [h["val_loss"] for h in slurm_history] == [h["val_loss"] for h in local_history]
    assert sorted(slurm_maps) == sorted(local_maps) and len(local_maps) == 3
    for tile in local_maps:
        np.testing.assert_array_equal(slurm_maps[tile], local_maps[tile])


def test_a_pending_job_shows_queued_with_its_slurm_id_and_reason_then_cancels(
    slurm_cluster: Any, start_daemon: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    blocker = slurm_cluster.submit("#!/bin/sh\nsleep 600\n", f"--cpus-per-task={os.cpu_count() or 2}")
    try:
        slurm_cluster.wait_state(blocker, "RUNNING", timeout=60)
        start_daemon(spool, train={"cpus": 1})
        client = SpoolClient(spool)
        job = client.submit(train_request(dataset(spool, "data")))
        status = wait_for(lambda: (s := client.status(job)) and (s.executor or {}).get("reason") and s, timeout=60)
        assert status.state.value == "queued"
        assert status.executor["name"] == "slurm" and status.executor["state"] == "PENDING"
        assert status.executor["job_id"] == slurm_id(spool, job) and status.executor["reason"] == "Resources"
        client.cancel(job)
        final = wait_state(client, job, TERMINAL, 60)
        assert final.state.value == "cancelled", final.error
        assert slurm_cluster.wait_state(status.executor["job_id"], "CANCELLED", timeout=30) == "CANCELLED"
        wait_for(lambda: (spool / "cancelled" / f"{job}.json").exists(), timeout=10)
    finally:
        slurm_cluster.run("scancel", blocker, check=False)


def test_cancel_of_a_running_training_publishes_nothing(slurm_cluster: Any, start_daemon: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    start_daemon(spool)
    client = SpoolClient(spool)
    job = client.submit(train_request(dataset(spool, "data"), epochs=500))
    wait_for(lambda: epoch_of(client, job) >= 1, timeout=180)
    client.cancel(job)
    final = wait_state(client, job, TERMINAL, 60)
    assert final.state.value == "cancelled", final.error
    assert list((spool / "models").iterdir()) == []
    assert not (spool / "jobs" / job / "checkpoint.pt").exists()


def test_a_job_cancelled_with_scancel_from_outside_fails_interrupted(
    slurm_cluster: Any, start_daemon: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    start_daemon(spool)
    client = SpoolClient(spool)
    job = client.submit(train_request(dataset(spool, "data"), epochs=500))
    wait_for(lambda: epoch_of(client, job) >= 1, timeout=180)
    slurm_cluster.run("scancel", slurm_id(spool, job))
    final = wait_state(client, job, TERMINAL, 60)
    assert final.state.value == "failed"
    assert final.error.code.value == "E_INTERRUPTED"
    assert "cancelled outside dlwatchd" in final.error.message and slurm_id(spool, job) in final.error.message
    wait_for(lambda: (spool / "failed" / f"{job}.json").exists(), timeout=10)  # the commit follows the status


def test_a_restarted_supervisor_reattaches_instead_of_submitting_again(
    slurm_cluster: Any, start_daemon: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    daemon = start_daemon(spool)
    client = SpoolClient(spool)
    job = client.submit(train_request(dataset(spool, "data"), epochs=6))
    wait_for(lambda: epoch_of(client, job) >= 1, timeout=180)
    first_id = slurm_id(spool, job)
    daemon.kill()
    assert slurm_cluster.job_state(first_id) == "RUNNING"  # the Slurm job does not depend on the supervisor
    start_daemon(spool)
    final = wait_state(client, job, TERMINAL, 300)
    assert final.state.value == "succeeded", final.error
    assert slurm_id(spool, job) == first_id
    log = (spool / "jobs" / job / "log.txt").read_text()
    assert log.count("submitted to Slurm as job") == 1 and f"re-attached to Slurm job {first_id}" in log
    assert final.result["epochs_trained"] == 6


def test_sbatch_refusing_the_job_fails_it_with_slurms_words(start_daemon: Any, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    start_daemon(spool, train={"gres": "gpu:1"})
    client = SpoolClient(spool)
    job = client.submit(train_request(dataset(spool, "data")))
    final = wait_state(client, job, TERMINAL, 60)
    assert final.state.value == "failed"
    assert final.error.code.value == "E_SCHEDULER"
    assert "refused" in final.error.message and "gres" in final.error.hint
    wait_for(lambda: (spool / "failed" / f"{job}.json").exists(), timeout=10)  # the commit follows the status
    assert (spool / "jobs" / job / "request.json").exists()
    health = wait_state(client, client.submit({"kind": "health"}), {"succeeded"}, 30)
    assert health.result["state"] == "ready"


def test_without_sbatch_the_job_stays_queued_and_the_daemon_says_why(
    slurm_cluster: Any, start_daemon: Any, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    start_daemon(spool, env={"PATH": str(Path(sys.executable).parent)})
    client = SpoolClient(spool)
    job = client.submit(train_request(dataset(spool, "data")))
    health = wait_for(
        lambda: (beat := json.loads((spool / "daemons" / "slurm-1.json").read_bytes()))["state"] == "degraded" and beat,
        timeout=30,
    )
    assert "sbatch" in health["reason"] and "not installed" in health["reason"]
    status = client.status(job)
    assert status is not None and status.state.value == "queued"
    assert (spool / "queued" / f"{job}.json").exists()


def test_a_time_limit_requeues_the_training_from_its_checkpoint(start_daemon: Any, tmp_path: Path) -> None:
    """Slurm's time limit (1 minute, enforced within about 30 s more) stops the job; it resumes from the checkpoint."""
    spool = tmp_path / "spool"
    start_daemon(spool, requeue_limit=1, train={"time_limit": "1"})
    client = SpoolClient(spool)
    request = train_request(dataset(spool, "data"), epochs=10000, early_stopping=False)
    job = client.submit(request)
    first_id = slurm_id(spool, job)
    requeued = wait_for(
        lambda: (s := client.status(job)) and (s.attempt >= 2 or s.state.value in TERMINAL) and s, timeout=200
    )
    assert requeued.state.value not in TERMINAL, requeued.error
    assert "requeued_after_slurm_timeout" in requeued.notes
    checkpoint_epoch = requeued.progress["epoch"]
    assert checkpoint_epoch >= 1
    wait_for(lambda: slurm_id(spool, job) != first_id, timeout=60)
    wait_for(lambda: epoch_of(client, job) > checkpoint_epoch, timeout=120)
    client.finish(job)
    final = wait_state(client, job, TERMINAL, 120)
    assert final.state.value == "succeeded", final.error
    assert final.result["epochs_trained"] > checkpoint_epoch
    log = (spool / "jobs" / job / "log.txt").read_text()
    assert f"Slurm job {first_id} ended TIMEOUT; queued again from the checkpoint" in log
