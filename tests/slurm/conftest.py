"""The `slurm_cluster` fixture: one throwaway Slurm cluster for the whole test session (see cluster.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A started SlurmCluster; skipped where Slurm cannot run, failed instead when DLWATCHD_REQUIRE_SLURM=1."""
    cluster = SlurmCluster()
    reason = None
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        reason = exc.reason
    if reason is not None:
        if os.environ.get("DLWATCHD_REQUIRE_SLURM") == "1":
            pytest.fail(f"DLWATCHD_REQUIRE_SLURM=1 but the Slurm test cluster is unavailable: {reason}", pytrace=False)
        pytest.skip(f"Slurm test cluster unavailable: {reason}")
    try:
        yield cluster
    finally:
        cluster.stop()
