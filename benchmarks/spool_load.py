"""Sustained load: many small inference requests from several client processes, served by several daemons.

    python benchmarks/spool_load.py [--requests 1000] [--clients 4] [--daemons 2] [--window 8]

One throwaway spool. The first daemon trains a small model through the spool (unet/resnet18, 64 px,
synthetic data); then every daemon serves `infer` requests (one 64 px PNG tile each, class averages) that
`--clients` processes publish, each keeping `--window` requests in flight. While they run, the spool's
invariants (dlwatchd.spool.invariants: each job in exactly one place, status.json always parseable, seq never
going back, terminal folders agreeing with the status) are checked every `--check-every` seconds.

Prints throughput, p50/p99 latency from pickup (intake) to done and from the client's rename to done, how
the work split between the daemons, and the invariant checks. Exits 1 when a request did not end succeeded
exactly once or an invariant broke.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from spool_daemon import publish, stamp_seconds, start_daemon, stop_daemon

from dlwatchd.client import SpoolClient
from dlwatchd.protocol.status import JobStatus
from dlwatchd.spool.invariants import SpoolChecker
from dlwatchd.synth import SynthSpec, write_dataset


def train_model(client: SpoolClient, spool: Path) -> str:
    data = spool / "inputs" / "train"
    write_dataset(data, SynthSpec(train=6, validation=3, size=64))
    classes = [c["name"] for c in json.loads((data / "config.json").read_text())["classes"]]
    job = client.submit(
        {
            "kind": "train",
            "model_type": "unet",
            "architecture": {"backbone": "resnet18", "input_size": [64, 64], "use_pretrained": False},
            "input_config": {"num_channels": 3, "bit_depth": 8},
            "classes": classes,
            "training": {"epochs": 1, "batch_size": 3, "seed": 1, "export_int8": False},
            "data_path": str(data),
        }
    )
    status = wait_terminal(client, [job], timeout=600)[job]
    if status.state.value != "succeeded":
        raise SystemExit(f"the training failed: {status.error}")
    return str(status.result["model_id"])


def wait_terminal(client: SpoolClient, jobs: list[str], timeout: float) -> dict[str, JobStatus]:
    deadline = time.monotonic() + timeout
    done: dict[str, JobStatus] = {}
    while time.monotonic() < deadline:
        for job in jobs:
            if job not in done and (status := client.status(job)) is not None and status.state.terminal:
                done[job] = status
        if len(done) == len(jobs):
            return done
        time.sleep(0.05)
    raise SystemExit(f"{len(jobs) - len(done)} jobs not finished after {timeout:.0f} s")


def client_process(spool: str, model_id: str, tiles: list[str], count: int, window: int, name: str, out: Any) -> None:
    """Publish `count` infer requests, at most `window` unfinished at a time; report (job id, rename time)."""
    published: list[tuple[str, float]] = []
    pending: set[str] = set()
    number = 0
    while number < count or pending:
        while number < count and len(pending) < window:
            job = f"{name}-{number:05d}"
            tile = tiles[number % len(tiles)]
            request = {"kind": "infer", "model_id": model_id, "tiles": [{"id": "t", "data": tile}]}
            published.append((job, publish(Path(spool), job, request)))
            pending.add(job)
            number += 1
        time.sleep(0.02)
        for job in list(pending):
            if (Path(spool) / "done" / f"{job}.json").exists() or (Path(spool) / "failed" / f"{job}.json").exists():
                pending.discard(job)
    out.put(published)


class InvariantWatch(threading.Thread):
    def __init__(self, spool: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.checker, self.every = SpoolChecker(spool), every
        self.problems: list[str] = []
        self.rounds = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.problems += self.checker.check()
            self.rounds += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--daemons", type=int, default=2)
    parser.add_argument("--window", type=int, default=8, help="requests each client keeps in flight")
    parser.add_argument("--check-every", type=float, default=0.25, help="seconds between invariant checks")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    root = Path(tempfile.mkdtemp(prefix="dlwatchd-load-"))
    spool = root / "spool"
    spool.mkdir()
    client = SpoolClient(spool)
    daemons = [start_daemon(spool, daemon_id="load-1")]
    try:
        started = time.perf_counter()
        model_id = train_model(client, spool)
        print(f"model {model_id} trained through the spool in {time.perf_counter() - started:.1f} s")
        daemons += [start_daemon(spool, daemon_id=f"load-{n + 1}") for n in range(1, args.daemons)]
        rng = np.random.default_rng(0)
        tiles = []
        for number in range(16):
            path = spool / "inputs" / "tiles" / f"{number}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(path)
            tiles.append(str(path))

        watch = InvariantWatch(spool, args.check_every)
        watch.start()
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        shares = [args.requests // args.clients + (n < args.requests % args.clients) for n in range(args.clients)]
        clients = [
            context.Process(
                target=client_process, args=(str(spool), model_id, tiles, share, args.window, f"c{n}", results)
            )
            for n, share in enumerate(shares)
        ]
        begun = time.time()
        for process in clients:
            process.start()
        published = dict(item for _ in clients for item in results.get(timeout=3600))
        for process in clients:
            process.join()
        statuses = wait_terminal(client, list(published), timeout=120)
        watch.stopped.set()
        watch.join()
        watch.problems += watch.checker.check()
    finally:
        for daemon in daemons:
            stop_daemon(daemon)

    ends = collections.Counter(status.state.value for status in statuses.values())
    broken = [job for job, status in statuses.items() if status.state.value != "succeeded"]
    twice = []
    for job in published:
        places = [
            folder
            for folder in ("queued", "done", "failed", "cancelled", "rejected")
            if (spool / folder / f"{job}.json").exists()
        ]
        if places != ["done"] or any(name.startswith(f"{job}@") for name in os.listdir(spool / "running")):
            twice.append(job)
    retried = [job for job, status in statuses.items() if status.attempt != 1]
    finished = [stamp_seconds(s.finished_at) for s in statuses.values() if s.finished_at]
    pickup = [
        (stamp_seconds(s.finished_at) - stamp_seconds(s.created_at)) * 1000 for s in statuses.values() if s.finished_at
    ]
    submit = [(stamp_seconds(s.finished_at) - published[job]) * 1000 for job, s in statuses.items() if s.finished_at]
    elapsed = max(finished) - begun
    by_daemon = collections.Counter(status.daemon for status in statuses.values())

    print(
        f"{len(published)} infer requests (one 64 px tile each) from {args.clients} client processes, "
        f"{args.window} in flight each, {args.daemons} daemons on one spool"
    )
    print(
        f"  ended: {dict(ends)}; not succeeded: {len(broken)}; not exactly once in done/: {len(twice)}; "
        f"retried: {len(retried)}"
    )
    print(
        f"  throughput: {len(published) / elapsed:.1f} requests/s "
        f"({elapsed:.1f} s from the first rename to the last done)"
    )
    print(f"  pickup -> done: p50 {statistics.median(pickup):.0f} ms, p99 {percentile(pickup, 99):.0f} ms")
    print(f"  rename -> done: p50 {statistics.median(submit):.0f} ms, p99 {percentile(submit, 99):.0f} ms")
    print(f"  by daemon: {dict(sorted(by_daemon.items()))}")
    print(f"  invariant checks: {watch.rounds} rounds, {len(watch.problems)} problems")
    for problem in watch.problems[:20]:
        print(f"    {problem}")
    sys.exit(1 if broken or twice or watch.problems else 0)


if __name__ == "__main__":
    main()
