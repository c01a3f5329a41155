"""Settings of the Slurm executor: where and how `sbatch` places the jobs of each lane."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SlurmLaneSettings(BaseModel):
    """Resources asked for each Slurm job of one lane; None leaves the choice to the cluster's defaults."""

    model_config = ConfigDict(extra="forbid")

    time_limit: str | None = Field(None, description="sbatch --time, e.g. '24:00:00' or '30' (minutes)")
    gres: str | None = Field(None, description="sbatch --gres, e.g. 'gpu:1'")
    gpus: str | None = Field(None, description="sbatch --gpus, e.g. '1' or 'a100:1'")
    cpus: int | None = Field(None, ge=1, le=4096, description="sbatch --cpus-per-task")
    mem: str | None = Field(None, description="sbatch --mem, e.g. '32G'")


class SlurmSettings(BaseModel):
    """The `[slurm]` table of the config file; used when `executor = "slurm"`."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_args: list[str] = Field(default_factory=list, description="more sbatch arguments, one item each")
    command: list[str] = Field(
        default_factory=list,
        description="how a node starts dlwatchd, e.g. ['/opt/dlwatchd/.venv/bin/dlwatchd']; default: this daemon's",
    )
    train: SlurmLaneSettings = Field(default_factory=SlurmLaneSettings)
    infer: SlurmLaneSettings = Field(default_factory=SlurmLaneSettings)
    max_jobs: int = Field(8, ge=1, le=10000, description="Slurm jobs per lane submitted and not yet ended")
    requeue_limit: int = Field(3, ge=0, le=100, description="resubmissions of a training after a time limit")
    poll_interval: float = Field(2.0, ge=0.2, le=600, description="seconds between `scontrol show job` checks")
