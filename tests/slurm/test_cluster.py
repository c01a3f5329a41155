"""The throwaway Slurm cluster itself: jobs run, bad requests are refused, cancel and time limits work."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cluster import SlurmCluster, SlurmError


def test_trivial_job_completes_and_writes_its_file(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    job = slurm_cluster.submit(f"#!/bin/bash\necho hi > {out}\n")
    assert slurm_cluster.wait_state(job, "COMPLETED", timeout=60) == "COMPLETED"
    assert out.read_text() == "hi\n"
    assert slurm_cluster.job_info(job)["ExitCode"] == "0:0"


def test_gpu_request_is_refused_at_submit_time(slurm_cluster: SlurmCluster) -> None:
    jobs_before = slurm_cluster.run("scontrol", "show", "jobs", "-o").stdout.count("JobId=")
    with pytest.raises(SlurmError) as refused:
        slurm_cluster.submit("#!/bin/bash\ntrue\n", "--gres=gpu:1")
    assert refused.value.returncode != 0
    assert "gres" in refused.value.stderr.lower()
    assert slurm_cluster.run("scontrol", "show", "jobs", "-o").stdout.count("JobId=") == jobs_before


def test_scancel_cancels_a_running_job(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.submit("#!/bin/bash\nsleep 300\n")
    slurm_cluster.wait_state(job, "RUNNING", timeout=60)
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_state(job, "CANCELLED", timeout=30) == "CANCELLED"
    deadline = time.monotonic() + 30
    while job in slurm_cluster.queue() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job not in slurm_cluster.queue()
