"""Pickup latency: from the rename into incoming/ to the job's `running` state, native events vs polling.

Prints the median and 90th percentile over N sequential `health` requests per mode. The running time
is the daemon's own `started_at` stamp; both clocks are this machine's wall clock.
Usage: python benchmarks/pickup_latency.py [--requests 50]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

from spool_daemon import start_daemon, stop_daemon

from dlwatchd.client import SpoolClient


def measure(mode: str, requests: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        proc = start_daemon(spool, "--watch", mode)
        client = SpoolClient(spool)
        latencies = []
        try:
            for index in range(requests):
                time.sleep(random.uniform(0.05, 2.0))  # arbitrary moments, relative to the 2 s rescan too
                job_id = f"lat-{mode}-{index}"
                temp = spool / "incoming" / f".{job_id}.tmp"
                temp.write_bytes(b'{"kind": "health"}')
                published = time.time()
                os.rename(temp, spool / "incoming" / f"{job_id}.json")
                status = client.wait(job_id, timeout=30, poll=0.005)
                started = datetime.fromisoformat(status.started_at.replace("Z", "+00:00")).timestamp()
                latencies.append(1000.0 * (started - published))
        finally:
            stop_daemon(proc)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    results = {mode: measure(mode, args.requests) for mode in ("native", "polling")}
    print(f"pickup latency, rename -> running, {args.requests} health requests per mode (ms)")
    for mode, values in results.items():
        ordered = sorted(values)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        print(f"  {mode:8} median {statistics.median(values):8.1f}   p90 {p90:8.1f}   max {max(values):8.1f}")
    ratio = statistics.median(results["polling"]) / max(statistics.median(results["native"]), 0.001)
    print(f"  polling / native median ratio: {ratio:.1f}x (polling rescans every 2 s by default)")


if __name__ == "__main__":
    main()
