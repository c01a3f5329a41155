"""stderr log lines: journald `<N>` priorities when JOURNAL_STREAM is set, in the supervisor and in workers."""

from __future__ import annotations

import os
import subprocess
import sys

SNIPPET = """
import logging
from dlwatchd.journal import configure_stderr_logging
configure_stderr_logging(logging.INFO, source="worker[infer] %(name)s")
log = logging.getLogger("dlwatchd.jobs")
log.debug("hidden")
log.info("started")
log.warning("two\\nlines")
log.error("broken")
"""


def run(env_extra: dict[str, str]) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "JOURNAL_STREAM"}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=env, check=True)
    return done.stderr.splitlines()


def test_under_systemd_every_line_carries_its_priority() -> None:
    assert run({"JOURNAL_STREAM": "8:1234"}) == [
        "<6>worker[infer] dlwatchd.jobs: started",
        "<4>worker[infer] dlwatchd.jobs: two",
        "<4>lines",
        "<3>worker[infer] dlwatchd.jobs: broken",
    ]


def test_elsewhere_lines_carry_a_time_stamp_and_the_level_name() -> None:
    lines = run({})
    assert len(lines) == 4
    assert lines[0].endswith(" INFO worker[infer] dlwatchd.jobs: started")
    assert lines[3].endswith(" ERROR worker[infer] dlwatchd.jobs: broken")
    assert not any(line.startswith("<") for line in lines)
