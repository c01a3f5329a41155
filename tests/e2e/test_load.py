"""Several daemons on one spool under a stream of mixed jobs, with the spool's invariants checked all along."""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import pytest
from conftest import runs, wait_filed, wait_for

from dlwatchd.client import SpoolClient
from dlwatchd.protocol.status import JobStatus
from dlwatchd.spool.invariants import SpoolChecker

DAEMONS = ("alpha", "beta", "gamma")


class Checker:
    """Runs SpoolChecker every `every` seconds in a thread; collects whatever it finds."""

    def __init__(self, spool: Path, every: float = 0.1) -> None:
        self.checker = SpoolChecker(spool)
        self.problems: list[str] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._every = every
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.problems += self.checker.check()
            self.rounds += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.problems += self.checker.check()


@pytest.mark.parametrize("daemons", [2, 3])
def test_daemons_share_300_mixed_jobs(make_daemon, client: SpoolClient, spool: Path, daemons: int) -> None:
    names = DAEMONS[:daemons]
    for name in names:
        make_daemon(name)
    checker = Checker(spool)
    expected: dict[str, str] = {}
    bad: list[str] = []
    to_cancel: list[str] = []
    started = time.monotonic()
    for number in range(300):
        slot = number % 10
        if slot < 6:
            job = client.submit({"kind": "test-sleep", "steps": 1 + number % 3})
            expected[job] = "succeeded"
        elif slot == 6:
            job = client.submit({"kind": "test-train", "steps": 2, "step_s": 0.01})
            expected[job] = "succeeded"
        elif slot == 7:
            job = client.submit({"kind": "health" if number % 20 < 10 else "architectures"})
            expected[job] = "succeeded"
        elif slot == 8:
            job = client.submit({"kind": "test-sleep", "steps": 1, "crash": "bogus"})  # fails validation
            expected[job] = "rejected"
            bad.append(job)
        else:
            job = client.submit({"kind": "test-sleep", "steps": 40, "step_s": 0.02})
            expected[job] = "cancelled"
            to_cancel.append(job)
    for job in to_cancel:
        wait_for(lambda job=job: client.status(job) is not None, timeout=60)
        client.cancel(job)

    def settled() -> bool:
        return all((s := client.status(job)) is not None and s.state.terminal for job in expected)

    wait_for(settled, timeout=240, interval=0.2)
    elapsed = time.monotonic() - started
    checker.stop()
    assert checker.problems == [], checker.problems[:20]
    assert checker.rounds > 10, "the invariants were checked while the jobs ran"

    statuses: dict[str, JobStatus] = {job: client.status(job) for job in expected}  # type: ignore[misc]
    ends = collections.Counter(status.state.value for status in statuses.values())
    assert {job: s.state.value for job, s in statuses.items()} == expected, ends
    for job, status in statuses.items():
        folder = {"succeeded": "done", "rejected": "rejected", "cancelled": "cancelled"}[expected[job]]
        wait_filed(spool, job, folder)
        if status.kind in ("test-sleep", "test-train") and expected[job] == "succeeded":
            assert len(runs(spool, job)) == 1, f"{job} ran {len(runs(spool, job))} times"
            assert status.attempt == 1
    assert os.listdir(spool / "running") == [] and os.listdir(spool / "queued") == []
    by_daemon = collections.Counter(s.daemon for s in statuses.values() if s.state.value == "succeeded")
    assert set(by_daemon) == set(names), f"every daemon took work: {by_daemon}"
    print(f"300 jobs on {daemons} daemons in {elapsed:.1f} s: {dict(ends)}, by daemon {dict(by_daemon)}")
