"""Inference throughput: the reference's one-tile loop against dlwatchd through the spool, fp32 and bf16.

Model: unet/resnet34, 3 classes, briefly trained on dlwatchd.synth scenes (dense labels), exported with
export_onnx into a throwaway spool's models/ with percentile_99 tile-scope metadata. Tiles: synth scenes,
512x512 RGB PNG, in the spool's inputs/.

  (a) the reference's way: Pillow decode, numpy percentile_99, an ONNX Runtime session with default options,
      numpy softmax, ndarray.tofile, one tile at a time; ONNX Runtime alone is the sum of its session.run calls
  (b) dlwatchd, warm daemon, one infer-pixel request with every tile, precision fp32 (ONNX Runtime)
  (c) the same with precision int8 (model.int8.onnx, static QDQ quantization calibrated on 8 held-out crops)
      and with precision bf16 (PyTorch bf16 autocast, channels_last); where this CPU has no native bf16
      the request holds a subset of the tiles (emulated bf16 is several times slower; --bf16-tiles overrides)

(a) and (b) take turns over three rounds (two with --quick), each round over every tile, so this machine's
speed drifting between moments weighs on both alike; the ratio is given per round and as the median.
Then the bf16/fp32 agreement, single-tile 256x256 latency against the model's own compute time, and 4 clients
at once against one client sending the same requests in a row. Times are wall clock; daemon times are its own
status.json stamps (millisecond resolution). Prints figures and ratios; asserts nothing.
Usage: python benchmarks/infer_throughput.py [--quick] [--tiles N] [--bf16-tiles M]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from spool_daemon import publish, stamp_seconds, start_daemon, stop_daemon

from dlwatchd.client import SpoolClient, read_probabilities

GFLOP_PER_TILE = 62.6  # unet/resnet34, 3 in, 3 classes, one 512x512 tile
TILE = 512
SMALL = 256
CLASSES = ["Background", "Nucleus", "Fibre"]
MODEL_ID = "unet_bench"
NORMALIZATION = {
    "strategy": "percentile_99",
    "per_channel": True,
    "clip_percentile": 99.0,
    "min": 0.0,
    "max": 255.0,
    "scope": "tile",
    "stats": None,
}


@dataclass
class Plan:
    tiles: int
    bf16_tiles: int | None
    train_steps: int
    train_size: int
    train_batch: int
    train_budget_s: float
    latency_requests: int
    per_client: int
    clients: int = 4
    rounds: int = 3
    session_rounds: int = 20


def make_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(
            tiles=8,
            bf16_tiles=2,
            train_steps=5,
            train_size=128,
            train_batch=4,
            train_budget_s=20.0,
            latency_requests=10,
            per_client=3,
            rounds=2,
            session_rounds=3,
        )
    else:
        plan = Plan(
            tiles=32,
            bf16_tiles=8,
            train_steps=20,
            train_size=256,
            train_batch=2,
            train_budget_s=100.0,
            latency_requests=20,
            per_client=8,
        )
    if args.tiles:
        plan.tiles = args.tiles
    if args.bf16_tiles:
        plan.bf16_tiles = args.bf16_tiles
    if args.train_steps is not None:
        plan.train_steps = args.train_steps
    return plan


# ---- model and data ---------------------------------------------------------------------------------------------


def write_tiles(folder: Path, count: int, size: int, seed: int) -> tuple[list[Path], list[Path]]:
    """`count` synth scenes as size x size RGB PNG files; returns (image paths, dense truth paths)."""
    from dlwatchd.synth import SynthSpec, write_dataset

    stems = write_dataset(folder, SynthSpec(train=count, validation=0, size=size, classes=3, seed=seed))["train"]
    return (
        [folder / "train" / "images" / f"{stem}.png" for stem in stems],
        [folder / "train" / "truth" / f"{stem}.png" for stem in stems],
    )


def train(model: Any, plan: Plan, folder: Path) -> str:
    """A few AdamW steps on random crops of 512 px synth scenes (dense labels, the tiles' scale); returns a summary.

    BatchNorm statistics are then recomputed over the training crops: after a handful of steps the running averages
    still mostly hold their initial values, which would make eval-mode outputs meaningless.
    """
    import torch
    from PIL import Image

    from dlwatchd.engine.normalization import NormalizationConfig, Normalizer

    if plan.train_steps <= 0:
        return "random weights (not trained)"
    started = time.perf_counter()
    images, truths = write_tiles(folder, 8, TILE, seed=101)
    normalizer = Normalizer(NormalizationConfig.from_dict(NORMALIZATION))
    pixels = [normalizer.apply(np.asarray(Image.open(path).convert("RGB")))[0].transpose(2, 0, 1) for path in images]
    x = torch.from_numpy(np.stack(pixels))
    y = torch.from_numpy(np.stack([np.asarray(Image.open(path), dtype=np.int64) for path in truths]))
    generator = torch.Generator().manual_seed(0)
    size, batch = plan.train_size, plan.train_batch

    def crops() -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(len(x), (batch,), generator=generator).tolist()
        top, left = torch.randint(TILE - size + 1, (2, batch), generator=generator).tolist()
        boxes = list(zip(pick, top, left, strict=True))
        return (
            torch.stack([x[i, :, t : t + size, s : s + size] for i, t, s in boxes]),
            torch.stack([y[i, t : t + size, s : s + size] for i, t, s in boxes]),
        )

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses: list[float] = []
    for _ in range(plan.train_steps):
        inputs, labels = crops()
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if time.perf_counter() - started > plan.train_budget_s:
            break
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the recalibration batches
    with torch.no_grad():
        for _ in range(4):
            model(crops()[0])
    for norm in norms:
        norm.momentum = 0.1
    model.eval()
    cut = "" if len(losses) == plan.train_steps else f" (cut at the {plan.train_budget_s:.0f} s budget)"
    return (
        f"trained {len(losses)} AdamW steps on {batch} random {size} px crops of 512 px synth scenes{cut}, "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, BatchNorm recalibrated, {time.perf_counter() - started:.0f} s"
    )


def calibration_tiles(folder: Path, size: int) -> list[np.ndarray]:
    """Normalized size x size crops of synth scenes the benchmark never times, as a training's validation tiles."""
    from PIL import Image

    from dlwatchd.engine.normalization import NormalizationConfig, Normalizer

    normalizer = Normalizer(NormalizationConfig.from_dict(NORMALIZATION))
    images, _ = write_tiles(folder, 8, TILE, seed=202)
    crops = []
    for path in images:
        rgb = np.asarray(Image.open(path).convert("RGB"))[:size, :size]
        crops.append(normalizer.apply(rgb)[0].transpose(2, 0, 1))
    return crops


def make_model_folder(folder: Path, plan: Plan, scratch: Path) -> tuple[str, str]:
    """model.pt, model.onnx, metadata.json, preprocessing.json; returns (training summary, export summary)."""
    import torch

    from dlwatchd.artifacts.metadata import build_metadata, build_preprocessing
    from dlwatchd.engine.models import create_model
    from dlwatchd.engine.onnx_export import export_onnx
    from dlwatchd.engine.quantize import INT8_NAME, quantize_onnx

    torch.manual_seed(0)
    model = create_model("unet", "resnet34", 3, 3)
    trained = train(model, plan, scratch)
    folder.mkdir(parents=True)
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.pt")
    started = time.perf_counter()
    size = plan.train_size
    record = export_onnx(model, folder / "model.onnx", in_channels=3, input_size=(size, size))
    exported = (
        f"ONNX export {time.perf_counter() - started:.1f} s, verified {record['verified']}, "
        f"max diff {record.get('max_abs_diff', float('nan')):.1e}"
    )
    int8 = quantize_onnx(folder / "model.onnx", folder / INT8_NAME, calibration_tiles(scratch / "calibration", size))
    record["int8"] = int8
    exported += (
        f"; int8 export {int8.get('seconds', 0):.1f} s on {int8.get('calibration_tiles', 0)} {size} px tiles, "
        f"verified {int8['verified']}, argmax agreement with fp32 there {100 * int8.get('agreement', 0):.2f} %"
    )
    metadata = build_metadata(
        model_id=MODEL_ID,
        model_type="unet",
        architecture={
            "backbone": "resnet34",
            "input_size": [size, size],
            "use_pretrained": False,
            "frozen_layers": None,
        },
        input_config={
            "num_channels": 3,
            "channel_names": ["Red", "Green", "Blue"],
            "bit_depth": 8,
            "normalization": NORMALIZATION,
        },
        classes=CLASSES,
        unlabeled_index=255,
        normalization_stats=[],
        training={"summary": trained},
        onnx=record,
        extra_architecture={
            "encoder_base": "resnet34",
            "encoder_weights": None,
            "in_channels": 3,
            "num_classes": 3,
            "size_divisor": 32,
        },
    )
    (folder / "metadata.json").write_text(json.dumps(metadata))
    (folder / "preprocessing.json").write_text(json.dumps(build_preprocessing(metadata)))
    return trained, exported


# ---- (a) the reference's loop -----------------------------------------------------------------------------------


class ReferenceLoop:
    """One tile at a time, as the reference server does, with one warm session; `run` sums seconds per stage."""

    def __init__(self, onnx_path: Path, out_dir: Path, first_tile: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self._one(first_tile, write=False)  # warm: the session's first run allocates for the shape

    @staticmethod
    def _normalize(rgb: np.ndarray) -> np.ndarray:
        out = np.zeros(rgb.shape, dtype=np.float32)
        for c in range(rgb.shape[2]):
            plane = rgb[..., c]
            lo, hi = np.percentile(plane, 1.0), np.percentile(plane, 99.0)
            if hi > lo:
                out[..., c] = (np.clip(plane, lo, hi) - lo) / (hi - lo)
        return out

    def _one(self, path: Path, write: bool) -> tuple[float, float, float]:
        from PIL import Image

        t0 = time.perf_counter()
        rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        batch = np.ascontiguousarray(self._normalize(rgb).transpose(2, 0, 1)[None])
        t1 = time.perf_counter()
        logits = self.session.run(None, {"input": batch})[0][0]
        t2 = time.perf_counter()
        exp = np.exp(logits - logits.max(axis=0, keepdims=True))
        probabilities = exp / exp.sum(axis=0, keepdims=True)
        if write:
            probabilities.astype("<f4").tofile(self.out_dir / f"{path.stem}.bin")
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def run(self, tiles: list[Path]) -> dict[str, float]:
        totals = {"decode": 0.0, "onnx": 0.0, "write": 0.0}
        started = time.perf_counter()
        for path in tiles:
            decode, onnx, write = self._one(path, write=True)
            totals["decode"] += decode
            totals["onnx"] += onnx
            totals["write"] += write
        totals["wall"] = time.perf_counter() - started
        return totals


# ---- dlwatchd through the spool ---------------------------------------------------------------------------------


@dataclass
class Timed:
    job_id: str
    renamed: float  # client clock, just before the rename
    seen: float  # client clock, when the client read the terminal status
    started: float  # daemon stamp: running
    finished: float  # daemon stamp: terminal
    result: dict[str, Any]


def run_request(client: SpoolClient, spool: Path, job_id: str, request: dict[str, Any], poll: float) -> Timed:
    renamed = publish(spool, job_id, request)
    status = client.wait(job_id, timeout=3600, poll=poll)
    seen = time.time()
    if status.state.value != "succeeded":
        raise RuntimeError(f"{job_id} ended {status.state.value}: {status.error}")
    assert status.started_at is not None and status.finished_at is not None
    return Timed(
        job_id, renamed, seen, stamp_seconds(status.started_at), stamp_seconds(status.finished_at), status.result or {}
    )


def pixel_request(tiles: list[Path], output_dir: Path, precision: str) -> dict[str, Any]:
    return {
        "kind": "infer-pixel",
        "model_id": MODEL_ID,
        "tiles": [{"id": path.stem, "data": str(path)} for path in tiles],
        "output_dir": str(output_dir),
        "options": {"precision": precision},
    }


def warm(client: SpoolClient, spool: Path, tiles: list[Path], precision: str) -> None:
    """One tile through the daemon, so the model is loaded and its session allocated for the tile shape."""
    run_request(
        client, spool, f"warm-{precision}", pixel_request(tiles[:1], spool / "outputs" / "warm", precision), 0.05
    )


def throughput(
    client: SpoolClient, spool: Path, tiles: list[Path], precision: str, label: str = ""
) -> tuple[Timed, Path]:
    """Time one request holding every tile (the model already warm)."""
    out = spool / "outputs" / precision
    job_id = f"all-{precision}{label}"
    return run_request(client, spool, job_id, pixel_request(tiles, out, precision), 0.05), out


def read_map(folder: Path, stem: str, size: int) -> np.ndarray:
    return read_probabilities(folder / f"{stem}.bin", len(CLASSES), size, size)


def agreement(first: Path, second: Path, stems: list[str]) -> tuple[float, float, int]:
    """(argmax agreement %, max |p1 - p2|, pixels) over the tiles `stems` of two output folders."""
    same = pixels = 0
    worst = 0.0
    for stem in stems:
        a, b = read_map(first, stem, TILE), read_map(second, stem, TILE)
        same += int((a.argmax(0) == b.argmax(0)).sum())
        pixels += a.shape[1] * a.shape[2]
        worst = max(worst, float(np.abs(a - b).max()))
    return 100.0 * same / pixels, worst, pixels


def truth_accuracy(folder: Path, truths: list[Path]) -> tuple[float, float]:
    """(% of pixels whose argmax is the scene's true class, % of background pixels: an all-background score)."""
    from PIL import Image

    same = background = pixels = 0
    for truth_path in truths:
        truth = np.asarray(Image.open(truth_path))
        same += int((read_map(folder, truth_path.stem, TILE).argmax(0) == truth).sum())
        background += int((truth == 0).sum())
        pixels += truth.size
    return 100.0 * same / pixels, 100.0 * background / pixels


def session_pairs(model_path: Path, tile: Path, rounds: int) -> dict[str, float]:
    """Median ms per forward pass of one normalized tile for dlwatchd's dynamic-shape session and its fixed-shape one
    (as shape_sessions builds it), taking turns. A default-options session stays out: its threads are pinned to cores,
    which changes how the others run next to it."""
    import onnxruntime

    from dlwatchd.engine.io import read_image
    from dlwatchd.engine.loading import session_options
    from dlwatchd.engine.normalization import NormalizationConfig, Normalizer

    image = Normalizer(NormalizationConfig.from_dict(NORMALIZATION)).apply(read_image(tile))[0]
    batch = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32)
    fixed = {"batch": 1, "height": batch.shape[2], "width": batch.shape[3]}
    cpu = ["CPUExecutionProvider"]
    sessions = {
        "dynamic shape": onnxruntime.InferenceSession(str(model_path), session_options(), providers=cpu),
        "fixed shape": onnxruntime.InferenceSession(str(model_path), session_options(fixed), providers=cpu),
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for number in range(rounds + 1):
        order = list(sessions) if number % 2 == 0 else list(sessions)[::-1]
        for name in order:
            started = time.perf_counter()
            sessions[name].run(None, {"input": batch})
            if number:  # the first round allocates
                times[name].append(time.perf_counter() - started)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def model_compute_ms(model_dir: Path, tile: Path, repeats: int) -> tuple[float, float]:
    """Median ms of predict_probabilities on one normalized tile, and of decode + normalize, in this process."""
    from dlwatchd.engine.inference import predict_probabilities
    from dlwatchd.engine.io import read_image
    from dlwatchd.engine.model_cache import ModelCache
    from dlwatchd.engine.normalization import NormalizationConfig, Normalizer

    model = ModelCache().get(model_dir, use_gpu=True, precision="fp32")
    normalizer = Normalizer(NormalizationConfig.from_dict(NORMALIZATION))
    decode, compute = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        image = np.ascontiguousarray(normalizer.apply(read_image(tile))[0].transpose(2, 0, 1))
        t1 = time.perf_counter()
        predict_probabilities(model, [image])
        decode.append(t1 - t0)
        compute.append(time.perf_counter() - t1)
    return 1000 * statistics.median(compute[1:]), 1000 * statistics.median(decode[1:])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def class_request(tile: Path) -> dict[str, Any]:
    return {"kind": "infer", "model_id": MODEL_ID, "tiles": [{"id": "t", "data": str(tile)}]}


def clusters(times: list[float], gap: float = 0.05) -> int:
    """How many bursts the sorted `times` form (a new one after `gap` s of quiet): jobs started together."""
    ordered = sorted(times)
    return 1 + sum(1 for a, b in zip(ordered, ordered[1:], strict=False) if b - a > gap) if ordered else 0


def concurrent_clients(
    client: SpoolClient, spool: Path, tile: Path, clients: int, each: int, label: str
) -> list[Timed]:
    results: list[Timed] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one_client(index: int) -> None:
        try:
            for k in range(each):
                timed = run_request(client, spool, f"conc{label}-{index}-{k}", class_request(tile), 0.02)
                with lock:
                    results.append(timed)
        except BaseException as exc:  # reported after the join; a thread cannot raise into main
            errors.append(exc)

    threads = [threading.Thread(target=one_client, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


# ---- main -------------------------------------------------------------------------------------------------------


def say(*parts: str) -> None:
    """Print one line made of `parts` (keeps the long report lines readable in the source)."""
    print("".join(parts), flush=True)


def report_daemon(label: str, timed: Timed, count: int, rate_a: float, rate_ort: float) -> None:
    e2e = timed.finished - timed.renamed
    rate = count / e2e
    runtime = f"{timed.result.get('runtime')} on {timed.result.get('device')}"
    say(f"\n{label}: dlwatchd, warm daemon, one infer-pixel request of {count} tiles, {runtime}")
    say(
        f"    rename->succeeded {e2e:.1f} s (daemon stamp): {rate:.3f} tiles/s = {rate * GFLOP_PER_TILE:.1f} GFLOP/s",
        f" = {rate / rate_a:.2f}x (a), {rate / rate_ort:.2f}x ORT alone",
    )
    say(
        f"    pickup {1000 * (timed.started - timed.renamed):.0f} ms, running->succeeded ",
        f"{timed.finished - timed.started:.1f} s, client wall rename->seen {timed.seen - timed.renamed:.1f} s",
    )


def report_rounds(label: str, a_rates: list[float], runs: list[tuple[Timed, Path]], count: int) -> None:
    rates = [count / (timed.finished - timed.renamed) for timed, _ in runs]
    ratios = [rate / a for a, rate in zip(a_rates, rates, strict=True)]
    say(
        f"    each round against the (a) round just before it: {', '.join(f'{r:.2f}x' for r in ratios)}; ",
        f"median {label} {statistics.median(rates):.3f} tiles/s = {statistics.median(ratios):.2f}x (a)",
    )


def measure_latency(client: SpoolClient, spool: Path, model_dir: Path, small: Path, requests: int) -> None:
    warm = spool / "outputs" / "warm"
    run_request(client, spool, "warm-small", pixel_request([small], warm, "fp32"), 0.01)
    latency = []
    for i in range(requests):
        request = pixel_request([small], spool / "outputs" / f"lat{i}", "fp32")
        latency.append(run_request(client, spool, f"lat-{i}", request, 0.005))
    compute_ms, decode_ms = model_compute_ms(model_dir, small, 15)
    total = [1000 * (t.finished - t.renamed) for t in latency]
    rows = {
        "rename->succeeded": total,
        "  rename->running (pickup)": [1000 * (t.started - t.renamed) for t in latency],
        "  running->succeeded": [1000 * (t.finished - t.started) for t in latency],
        "overhead = latency - compute": [value - compute_ms for value in total],
    }
    say(f"\nsingle {SMALL}x{SMALL} tile, {requests} sequential infer-pixel requests on the warm daemon (ms)")
    for name, values in rows.items():
        say(f"    {name:30} p50 {percentile(values, 50):7.0f}   p95 {percentile(values, 95):7.0f}")
    say(
        f"    model compute, predict_probabilities on a ModelCache model (ORT) in this process: {compute_ms:.0f} ms",
        f" median; decode+normalize {decode_ms:.0f} ms",
    )


def measure_concurrency(client: SpoolClient, spool: Path, small: Path, clients: int, each: int) -> None:
    count = clients * each
    first = time.time()
    sequential = [run_request(client, spool, f"seq-{i}", class_request(small), 0.02) for i in range(count)]
    seq_s = max(t.finished for t in sequential) - first
    seq_rate = count / seq_s
    say(f"\n{count} single-tile {SMALL}x{SMALL} infer requests (class averages), warm daemon")
    say(f"    1 client, back to back:        {seq_s:6.1f} s = {seq_rate:.2f} requests/s")
    # The first burst brings batch sizes not seen before, whose fixed-shape sessions are built meanwhile.
    for label in ("first burst", "second burst"):
        first = time.time()
        concurrent = concurrent_clients(client, spool, small, clients, each, label.split()[0])
        conc_s = max(t.finished for t in concurrent) - first
        conc_rate = count / conc_s
        groups = clusters([t.started for t in concurrent])
        say(
            f"    {clients} clients x {each}, {label}: {conc_s:5.1f} s = {conc_rate:.2f} requests/s",
            f" = {conc_rate / seq_rate:.2f}x; jobs started in {groups} bursts (~{count / groups:.1f} per group)",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 tiles, a shorter training, fewer requests (~2 min)")
    parser.add_argument("--tiles", type=int, default=0, help="512x512 tiles for (a) and (b)")
    parser.add_argument("--bf16-tiles", type=int, default=0, help="tiles for (c); default all where bf16 is native")
    parser.add_argument("--train-steps", type=int, default=None, help="0: random weights")
    args = parser.parse_args()
    plan = make_plan(args)

    import onnxruntime
    import torch

    from dlwatchd.engine.device import cpu_description

    cpu = cpu_description()
    if cpu["bf16_native"] and not args.bf16_tiles:
        plan.bf16_tiles = None
    n = plan.tiles
    bf16_count = min(n, plan.bf16_tiles or n)
    began = time.perf_counter()
    say(f"infer throughput: unet/resnet34, 3 classes, {n} synth tiles {TILE}x{TILE} RGB PNG", " (quick)" * args.quick)
    say(
        f"  cpu {cpu['cpu_name']}, {cpu['cpu_count']} logical cores, torch threads {torch.get_num_threads()}, ",
        f"{cpu['cpu_capability']}, bf16 native {cpu['bf16_native']}; torch {torch.__version__}, ",
        f"onnxruntime {onnxruntime.__version__}; load average {os.getloadavg()[0]:.1f} at the start",
    )

    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        model_dir = spool / "models" / MODEL_ID
        trained, exported = make_model_folder(model_dir, plan, Path(tmp) / "train")
        say(f"  model: {trained}; {exported}")
        tiles, truths = write_tiles(spool / "inputs" / "tiles", n, TILE, seed=7)
        small = spool / "inputs" / f"single_{SMALL}.png"
        from PIL import Image

        Image.open(tiles[0]).crop((0, 0, SMALL, SMALL)).save(small)

        reference_dir = spool / "outputs" / "reference"
        reference = ReferenceLoop(model_dir / "model.onnx", reference_dir, tiles[0])
        proc = start_daemon(spool)
        client = SpoolClient(spool)
        try:
            warm(client, spool, tiles, "fp32")
            warm(client, spool, tiles, "int8")
            # (a), (b) and (c) int8 take turns, so the speed of this machine at each moment weighs on all alike
            refs, fp32_runs, int8_runs = [], [], []
            for number in range(plan.rounds):
                refs.append(reference.run(tiles))
                fp32_runs.append(throughput(client, spool, tiles, "fp32", f"-{number}"))
                int8_runs.append(throughput(client, spool, tiles, "int8", f"-{number}"))
            fp32_dir = fp32_runs[0][1]
            a_rates = [n / ref["wall"] for ref in refs]
            ort_rates = [n / ref["onnx"] for ref in refs]
            rate_a, rate_ort = statistics.median(a_rates), statistics.median(ort_rates)
            ref = refs[-1]
            say(
                "\n(a) reference loop, one tile at a time: Pillow, numpy percentile_99, ORT session with default ",
                "options, numpy softmax, ndarray.tofile; warm session; ",
                f"{plan.rounds} rounds taking turns with (b) and (c) int8",
            )
            say(
                f"    median {rate_a:.3f} tiles/s = {rate_a * GFLOP_PER_TILE:.1f} GFLOP/s ",
                f"(rounds: {', '.join(f'{rate:.2f}' for rate in a_rates)})",
                f"   [last round, per tile: decode+normalize {1000 * ref['decode'] / n:.0f} ms, ",
                f"ORT {1000 * ref['onnx'] / n:.0f} ms, softmax+write {1000 * ref['write'] / n:.0f} ms]",
            )
            say(f"    ONNX Runtime alone: median {rate_ort:.3f} tiles/s = {rate_ort * GFLOP_PER_TILE:.1f} GFLOP/s")
            pairs = session_pairs(model_dir / "model.onnx", tiles[0], plan.session_rounds)
            base = pairs["dynamic shape"]
            say(
                f"    dlwatchd's ORT sessions taking turns, {plan.session_rounds} rounds, {TILE} px tile, median: ",
                ", ".join(f"{name} {ms:.0f} ms ({base / ms:.2f}x)" for name, ms in pairs.items()),
            )
            report_daemon("(b) fp32", fp32_runs[-1][0], n, rate_a, rate_ort)
            report_rounds("(b)", a_rates, fp32_runs, n)
            int8_dir = int8_runs[0][1]
            report_daemon("(c) int8", int8_runs[-1][0], n, rate_a, rate_ort)
            report_rounds("(c) int8", a_rates, int8_runs, n)
            warm(client, spool, tiles, "bf16")
            bf16, bf16_dir = throughput(client, spool, tiles[:bf16_count], "bf16")
            report_daemon("(c) bf16", bf16, bf16_count, rate_a, rate_ort)
            if not cpu["bf16_native"]:
                say(
                    "    this CPU has no native bf16 (no avx512_bf16/amx_bf16): bf16 is emulated, figures reported ",
                    f"anyway; (c) ran {bf16_count} of the {n} tiles",
                )
            stems = [path.stem for path in tiles]
            int8_agree, int8_worst, int8_pixels = agreement(fp32_dir, int8_dir, stems)
            agree, worst, pixels = agreement(fp32_dir, bf16_dir, stems[:bf16_count])
            ref_agree, ref_worst, _ = agreement(reference_dir, fp32_dir, stems)
            say(f"\nagreement ({len(CLASSES)} classes, probabilities read back with read_probabilities)")
            say(
                f"    (c) int8 vs (b) fp32, {n} tiles = {int8_pixels / 1e6:.2f} M pixels: argmax {int8_agree:.3f} %, ",
                f"max |p diff| {int8_worst:.4f}",
            )
            say(
                f"    (c) bf16 vs (b) fp32, {bf16_count} tiles = {pixels / 1e6:.2f} M pixels: argmax {agree:.3f} %, ",
                f"max |p diff| {worst:.4f}",
            )
            say(f"    (a) reference vs (b) fp32, {n} tiles: argmax {ref_agree:.3f} %, max |p diff| {ref_worst:.1e}")
            accuracy, background = truth_accuracy(fp32_dir, truths)
            say(
                f"    (b) argmax vs the synth scenes' dense truth: {accuracy:.1f} % of pixels ",
                f"(answering background everywhere: {background:.1f} %)",
            )

            measure_latency(client, spool, model_dir, small, plan.latency_requests)
            measure_concurrency(client, spool, small, plan.clients, plan.per_client)
        finally:
            stop_daemon(proc)
    say(f"\ntotal {time.perf_counter() - began:.0f} s; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    sys.exit(main())
