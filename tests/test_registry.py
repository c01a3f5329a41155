"""The kinds the daemon registers are exactly the protocol's request kinds."""

from __future__ import annotations

import pytest

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import JobKind, KindRegistry, build_registry, resolve_handler
from dlwatchd.protocol.requests import REQUEST_MODELS, HealthRequest


def test_registered_kinds_equal_the_protocol_kinds() -> None:
    registry = build_registry()
    assert registry.names() == sorted(REQUEST_MODELS)
    for kind in registry.kinds():
        assert kind.request_model is REQUEST_MODELS[kind.name]


def test_every_available_handler_resolves() -> None:
    for kind in build_registry().kinds():
        if kind.handler is not None:
            assert callable(resolve_handler(kind.handler))


def test_a_duplicate_registration_raises() -> None:
    registry = KindRegistry()
    registry.register(JobKind("health", HealthRequest, None, None))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(JobKind("health", HealthRequest, None, None))


def test_an_unknown_kind_lists_the_valid_ones() -> None:
    with pytest.raises(DlwatchdError) as info:
        build_registry().get("make-coffee")
    assert info.value.code is ErrorCode.SCHEMA
    assert "gpu-clear" in info.value.message and "health" in info.value.message


def test_names_filter_with_fnmatch() -> None:
    assert build_registry().names("*-info") == ["architecture-info", "encoder-info"]


def test_kinds_without_an_engine_are_refused_clearly() -> None:
    registry = KindRegistry()
    registry.register(JobKind("health", HealthRequest, "query", None))  # a lane but no engine
    with pytest.raises(DlwatchdError) as info:
        registry.require_available("health")
    assert info.value.code is ErrorCode.PROTOCOL and "not available" in info.value.message


def test_a_missing_plugin_is_a_clear_error() -> None:
    with pytest.raises(DlwatchdError) as info:
        build_registry(["no_such_plugin_module"])
    assert info.value.code is ErrorCode.NOT_FOUND and "no_such_plugin_module" in info.value.message
