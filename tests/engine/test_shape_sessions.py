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
from dlwatchd.engine.loading import LoadedModel, load_model, session_options
from dlwatchd.engine.shape_sessions import AGE_EVERY, LIMIT, SIGHTINGS, ShapeSessions, dimension_overrides

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
        ([1, 3, 64, 64], (1, 3, 64, 64), None),  # already fixed: another session would only cost memory
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
        options = session_options(overrides)
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


def see(sessions: ShapeSessions, shape: tuple[int, ...], times: int) -> object:
    for _ in range(times):
        sessions.session_for(shape)
    sessions.wait(10)
    return sessions.session_for(shape)


def test_at_most_limit_sessions_are_kept_for_the_shapes_seen_most() -> None:
    built: list[dict[str, int]] = []
    sessions = ShapeSessions(DIMS, lambda overrides: built.append(overrides) or f"session{len(built)}")
    shapes = [(batch, 3, 64, 64) for batch in range(1, LIMIT + 2)]
    for shape in shapes[:LIMIT]:
        assert see(sessions, shape, SIGHTINGS) is not None
    # shapes that come about equally often (batch sizes of concurrent requests) do not take turns
    for _ in range(5):
        for shape in shapes:
            sessions.session_for(shape)
    assert len(built) == LIMIT and sessions.shapes() == shapes[:LIMIT]
    # a shape seen more than twice as often as the least seen one takes its place
    for shape in shapes[1:LIMIT]:
        see(sessions, shape, 20)
    assert see(sessions, shapes[-1], 30) is not None
    assert sessions.shapes() == shapes[1:], "the least seen shape made way"
    assert sessions.session_for(shapes[0]) is None


def test_counts_age_so_a_shape_no_longer_sent_loses_its_place() -> None:
    sessions = ShapeSessions(DIMS, lambda overrides: "session")
    old = [(1, 3, 32 * index, 32) for index in range(1, LIMIT + 1)]
    for shape in old:
        see(sessions, shape, 100)
    new = (1, 3, 512, 512)
    see(sessions, new, 150)
    assert new not in sessions.shapes(), "150 is not more than twice 100"
    # the counts are halved every AGE_EVERY sightings: the new shape keeps coming, the old ones do not
    assert see(sessions, new, AGE_EVERY) is not None
    assert new in sessions.shapes() and len(sessions.shapes()) == LIMIT


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
