"""Supervisor footprint: idle CPU and memory of `dlwatchd run`, its workers' memory, and `dlwatchd --help` time.

Linux only (reads /proc). Usage: python benchmarks/supervisor_footprint.py [--idle-seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spool_daemon import start_daemon, stop_daemon

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def workers_of(pid: int) -> list[int]:
    """The lane workers among the children (the multiprocessing resource tracker is left out)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    pids = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def help_time(runs: int = 10) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dlwatchd", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"dlwatchd --help: median {1000 * help_time():.0f} ms over 10 runs")
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_daemon(Path(tmp) / "spool")
        time.sleep(2.0)  # let the workers finish warming up
        before = cpu_seconds(proc.pid)
        time.sleep(args.idle_seconds)
        used = cpu_seconds(proc.pid) - before
        supervisor = rss_mib(proc.pid)
        workers = {pid: rss_mib(pid) for pid in workers_of(proc.pid)}
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        stop_daemon(proc)
    print(f"supervisor idle CPU: {100 * used / args.idle_seconds:.2f}% of one core over {args.idle_seconds:.0f} s")
    print(f"supervisor RSS: {supervisor:.1f} MiB (torch loaded in the supervisor: {'libtorch' in maps})")
    print(f"worker RSS (warm, torch loaded): {', '.join(f'{v:.0f}' for v in workers.values())} MiB")


if __name__ == "__main__":
    main()
