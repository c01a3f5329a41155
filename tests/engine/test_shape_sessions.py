"""Fixed-shape ONNX Runtime sessions: when they are built, that they answer as the dynamic one does, their limits."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from test_inference import make_model_folder

from dlwatchd.engine import shape_sessions
from dlwatchd.engine.inference import LoadedModel, _session_options, load_model
from dlwatchd.engine.shape_sessions import LIMIT, SIGHTINGS, ShapeSessions, dimension_overrides

DIMS = ["batch", 3, "height", "width"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("models") / "fixed", 3, 2, onnx=True)


def settle(model: LoadedModel) -> ShapeSessions:
    assert model.fixed_shapes is not None
    model.fixed_shapes.wait(60)
    return model.fixed_shapes


@pytest.mark.parametrize(
    ("dims", "shape", "expected"),
    [
        (DIMS, (2, 3, 64, 96), {"batch": 2, "height": 64, "width": 96}),
        (["n", 3, "side", "side"], (1, 3, 64, 64), {"n": 1, "side": 64}),
        (["n", 3, "side", "side"], (1, 3, 64, 96), None),  # one name, two sizes
        ([None, 3, "height", "width"], (1, 3, 64, 64), None),  # an unnamed dynamic dimension
        (DIMS, (1, 4, 64, 64), None),  # the fixed channel count disagrees
        (DIMS, (3, 64, 64), None),
    ],
)
def test_dimension_overrides(dims, shape, expected) -> None:
    assert dimension_overrides(dims, shape) == expected


def test_a_shape_seen_twice_gets_a_session_that_answers_bit_for_bit_as_the_dynamic_one(folder: Path) -> None:
    model = load_model(folder, use_gpu=False)
    batch = np.random.default_rng(3).random((2, 3, 64, 96), dtype=np.float32)
    dynamic = [model.forward(batch) for _ in range(SIGHTINGS)]
    sessions = settle(model)
    assert sessions.shapes() == [(2, 3, 64, 96)]
    fixed = model.forward(batch)
    assert np.array_equal(fixed, dynamic[0]) and np.array_equal(dynamic[0], dynamic[1])
    # another shape still runs (on the dynamic session) while the first keeps its own
    other = np.random.default_rng(4).random((1, 3, 32, 32), dtype=np.float32)
    assert model.forward(other).shape == (1, 2, 32, 32)
    assert sessions.shapes() == [(2, 3, 64, 96)]


def test_the_fixed_shape_graph_has_its_shape_arithmetic_folded_away(folder: Path, tmp_path: Path) -> None:
    def optimized(overrides: dict[str, int] | None, name: str) -> onnx.ModelProto:
        options = _session_options(overrides)
        options.optimized_model_filepath = str(tmp_path / name)
        options.log_severity_level = 3  # the hardware-specific-graph notice on saving
        onnxruntime.InferenceSession(
            str(folder / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )
        return onnx.load(str(tmp_path / name))

    dynamic = optimized(None, "dynamic.onnx")
    fixed = optimized({"batch": 1, "height": 64, "width": 64}, "fixed.onnx")
    shape_ops = {"Shape", "Gather", "Unsqueeze", "Slice"}
    assert any(node.op_type in shape_ops for node in dynamic.graph.node)
    assert not any(node.op_type in shape_ops for node in fixed.graph.node)
    assert len(fixed.graph.node) < len(dynamic.graph.node)


def test_a_model_file_replaced_before_the_build_keeps_the_dynamic_session(
    folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in os.listdir(folder):
        (copy / name).write_bytes((folder / name).read_bytes())
    model = load_model(copy, use_gpu=False)
    batch = np.random.default_rng(5).random((1, 3, 64, 64), dtype=np.float32)
    first = model.forward(batch)
    data = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").write_bytes(data)  # same bytes, another file: not the one that was loaded
    with caplog.at_level(logging.WARNING, logger="dlwatchd.inference"):
        model.forward(batch)
        sessions = settle(model)
        assert np.array_equal(model.forward(batch), first)
    assert sessions.shapes() == []
    assert "changed since the model was loaded" in caplog.text


def test_at_most_limit_sessions_are_kept_least_recently_used_first() -> None:
    built: list[dict[str, int]] = []
    sessions = ShapeSessions(DIMS, lambda overrides: built.append(overrides) or f"session{len(built)}")
    shapes = [(1, 3, 32 * (index + 1), 32) for index in range(LIMIT + 1)]
    for shape in shapes:
        for _ in range(SIGHTINGS):
            sessions.session_for(shape)
        sessions.wait(10)
        assert sessions.session_for(shape) is not None
    assert len(built) == LIMIT + 1
    assert sessions.shapes() == shapes[1:]
    assert sessions.session_for(shapes[0]) is None  # evicted; counted again from one


def test_one_build_at_a_time_and_a_failed_build_is_not_retried(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    calls: list[dict[str, int]] = []

    def build(overrides: dict[str, int]) -> str:
        calls.append(overrides)
        release.wait(10)
        if overrides["height"] == 64:
            raise MemoryError("no room for another session")
        return "session"

    sessions = ShapeSessions(DIMS, build, label="of test ")
    slow, other = (1, 3, 64, 64), (1, 3, 96, 96)
    for _ in range(SIGHTINGS):
        sessions.session_for(slow)
        sessions.session_for(other)
    time.sleep(0.05)
    assert len(calls) == 1, "a second build waits for the first"
    with caplog.at_level(logging.WARNING, logger="dlwatchd.inference"):
        release.set()
        sessions.wait(10)
        for _ in range(SIGHTINGS * 3):
            assert sessions.session_for(slow) is None
    assert "no fixed-shape ONNX session of test (1, 3, 64, 64) (no room for another session)" in caplog.text
    assert caplog.text.count("no fixed-shape") == 1
    # the other shape was counted meanwhile and gets its build now
    sessions.session_for(other)
    sessions.wait(10)
    assert sessions.session_for(other) == "session"
    assert [call["height"] for call in calls] == [64, 96]


def test_a_fixed_session_that_fails_to_run_hands_the_shape_back() -> None:
    sessions = ShapeSessions(DIMS, lambda overrides: "session")
    shape = (1, 3, 64, 64)
    for _ in range(SIGHTINGS):
        sessions.session_for(shape)
    sessions.wait(10)
    assert sessions.session_for(shape) == "session"
    sessions.drop(shape, RuntimeError("bad allocation"))
    assert [sessions.session_for(shape) for _ in range(3)] == [None] * 3
    assert sessions.shapes() == []


def test_the_counting_table_is_bounded() -> None:
    sessions = ShapeSessions(DIMS, lambda overrides: "session")
    for height in range(shape_sessions._COUNTED * 2):
        sessions.session_for((1, 3, height + 1, 32))
    assert len(sessions._seen) == shape_sessions._COUNTED
