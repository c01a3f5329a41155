"""The executor's Slurm plumbing without a cluster: output parsing, sbatch options, a missing sbatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from dlwatchd.jobs._registry import build_registry
from dlwatchd.settings import Settings
from dlwatchd.slurm.commands import SlurmCommands, SlurmUnreachable, parse_show_job
from dlwatchd.supervisor.slurm_lane import SlurmLane

SHOW_PENDING = (
    "JobId=42 JobName=dlwatchd-abc UserId=root(0) GroupId=root(0) Priority=1 JobState=PENDING Reason=Resources "
    "Dependency=(null) Requeue=0 Restarts=0 BatchFlag=1 ExitCode=0:0 RunTime=00:00:00 TimeLimit=UNLIMITED\n"
)


def test_a_pending_record_is_read_with_its_reason() -> None:
    job = parse_show_job(SHOW_PENDING)
    assert job is not None
    assert (job.job_id, job.state, job.reason, job.exit_code, job.name) == (
        "42",
        "PENDING",
        "Resources",
        "0:0",
        "dlwatchd-abc",
    )
    assert not job.ended


@pytest.mark.parametrize(
    ("state", "ended"),
    [("RUNNING", False), ("COMPLETING", False), ("COMPLETED", True), ("CANCELLED+", True), ("TIMEOUT", True)]
    + [("NODE_FAIL", True), ("PREEMPTED", True), ("OUT_OF_MEMORY", True), ("FAILED", True)],
)
def test_states_with_flags_are_read_plain(state: str, ended: bool) -> None:
    job = parse_show_job(SHOW_PENDING.replace("JobState=PENDING Reason=Resources", f"JobState={state} Reason=None"))
    assert job is not None and job.state == state.rstrip("+")
    assert job.reason is None
    assert job.ended is ended


def test_no_record_is_none() -> None:
    assert parse_show_job("") is None
    assert parse_show_job("slurm_load_jobs error: Invalid job id specified\n") is None


def test_a_missing_sbatch_is_unreachable_not_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmUnreachable, match="'sbatch' is not installed"):
        SlurmCommands().submit(tmp_path / "job.sh", [])


def test_sbatch_options_come_from_the_lane_settings(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "spool": tmp_path / "spool",
            "executor": "slurm",
            "slurm": {
                "partition": "gpu",
                "account": "lab",
                "qos": "normal",
                "extra_args": ["--constraint=a100"],
                "train": {"time_limit": "24:00:00", "gres": "gpu:1", "cpus": 8, "mem": "32G"},
                "infer": {"gpus": "1"},
            },
        }
    )
    registry = build_registry()
    train = SlurmLane("train", settings, registry, 20).sbatch_args("job-1")
    assert train[:2] == ["--job-name=dlwatchd-job-1", f"--chdir={tmp_path / 'spool'}"]
    assert f"--output={tmp_path / 'spool' / 'jobs' / 'job-1' / 'slurm-%j.out'}" in train
    assert {"--hold", "--no-requeue", "--partition=gpu", "--account=lab", "--qos=normal"} <= set(train)
    assert {"--time=24:00:00", "--gres=gpu:1", "--cpus-per-task=8", "--mem=32G"} <= set(train)
    assert train[-1] == "--constraint=a100"
    infer = SlurmLane("infer", settings, registry, 20).sbatch_args("job-2")
    assert "--gpus=1" in infer and not any(arg.startswith(("--gres", "--time")) for arg in infer)


def test_unknown_slurm_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="partiton"):
        Settings.model_validate({"spool": tmp_path, "slurm": {"partiton": "gpu"}})
