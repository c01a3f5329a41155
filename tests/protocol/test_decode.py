"""decode.py: request bytes -> validated request, with the protocol's limits and error shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.jobs._registry import KindRegistry, build_registry
from dlwatchd.protocol.decode import (
    MAX_DEPTH,
    MAX_REQUEST_BYTES,
    MAX_STRING,
    JsonSyntaxError,
    check_limits,
    decode_request,
    dotted,
    parse_json,
    schema_error,
)
from dlwatchd.protocol.requests import HealthRequest, LayersRequest
from dlwatchd.protocol.status import ErrorInfo

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def registry() -> KindRegistry:
    return build_registry()


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


def decode_error(data: bytes, registry: KindRegistry, **kwargs: Any) -> DlwatchdError:
    with pytest.raises(DlwatchdError) as info:
        decode_request(data, registry, **kwargs)
    return info.value


def infer_request(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "infer", "model_id": "m1", "tiles": [{"id": "t1", "data": "x.png"}]}
    body.update(changes)
    return body


# --- size cap --------------------------------------------------------------------------------


def test_the_default_cap_is_32_mib() -> None:
    assert MAX_REQUEST_BYTES == 32 * 1024 * 1024


def test_a_request_of_exactly_the_cap_is_parsed() -> None:
    body = b'{"kind": "health"}'
    assert parse_json(body + b" " * (1024 - len(body)), max_bytes=1024) == {"kind": "health"}


def test_a_request_one_byte_over_the_cap_is_too_large_before_parsing(registry: KindRegistry) -> None:
    body = b'{"kind": "health"}'
    error = decode_error(body + b" " * (1025 - len(body)), registry, max_bytes=1024)
    assert error.code is ErrorCode.TOO_LARGE
    assert "1025" in error.message and "1024" in error.message
    # Garbage over the cap is also E_TOO_LARGE: the size is checked before the syntax.
    assert decode_error(b"\xff" * 1025, registry, max_bytes=1024).code is ErrorCode.TOO_LARGE


# --- encoding --------------------------------------------------------------------------------


def test_a_utf8_bom_is_tolerated(registry: KindRegistry) -> None:
    decoded = decode_request(BOM + b'{"kind": "health", "meta": {"note": "\xc3\xa9"}}', registry)
    assert decoded.kind == "health"
    assert decoded.raw["meta"] == {"note": "\u00e9"}


def test_invalid_utf8_is_bad_json(registry: KindRegistry) -> None:
    error = decode_error(b'{"kind": "health", "meta": {"a": "\xff\xfe"}}', registry)
    assert error.code is ErrorCode.BAD_JSON
    assert "UTF-8" in error.message


def test_a_lone_surrogate_escape_is_bad_json(registry: KindRegistry) -> None:
    error = decode_error(b'{"kind": "health", "meta": {"a": "\\ud800"}}', registry)
    assert error.code is ErrorCode.BAD_JSON


# --- JSON syntax -----------------------------------------------------------------------------


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_literals_are_refused(registry: KindRegistry, literal: str) -> None:
    error = decode_error(f'{{"kind": "health", "meta": {{"a": {literal}}}}}'.encode(), registry)
    assert error.code is ErrorCode.BAD_JSON
    assert literal in error.message


def test_a_float_that_overflows_to_infinity_is_refused(registry: KindRegistry) -> None:
    error = decode_error(b'{"kind": "health", "meta": {"a": 1e400}}', registry)
    assert error.code in (ErrorCode.BAD_JSON, ErrorCode.SCHEMA)


@pytest.mark.parametrize(
    "data",
    [b'{"kind": "health", "kind": "health"}', b'{"kind": "health", "meta": {"a": 1, "a": 2}}'],
    ids=["top-level", "nested"],
)
def test_duplicate_keys_are_refused(registry: KindRegistry, data: bytes) -> None:
    error = decode_error(data, registry)
    assert error.code is ErrorCode.BAD_JSON
    assert "twice" in error.message


def test_a_syntax_error_reports_line_and_column(registry: KindRegistry) -> None:
    error = decode_error(b'{\n  "kind": "health",\n  "x": ?\n}', registry)
    assert isinstance(error, JsonSyntaxError)
    assert error.code is ErrorCode.BAD_JSON
    assert (error.line, error.column) == (3, 8)
    assert "line 3, column 8" in error.message
    info = ErrorInfo.from_error(error)
    assert (info.line, info.column) == (3, 8)


def test_line_and_column_do_not_count_the_bom(registry: KindRegistry) -> None:
    error = decode_error(BOM + b'{"kind" "health"}', registry)
    assert isinstance(error, JsonSyntaxError)
    assert (error.line, error.column) == (1, 9)  # the second quote, counted from the '{'


def test_an_empty_file_is_bad_json_at_line_1_column_1(registry: KindRegistry) -> None:
    error = decode_error(b"", registry)
    assert isinstance(error, JsonSyntaxError)
    assert (error.code, error.line, error.column) == (ErrorCode.BAD_JSON, 1, 1)


def test_a_number_of_100000_digits_is_bad_json(registry: KindRegistry) -> None:
    error = decode_error(b'{"kind": "health", "meta": {"a": ' + b"7" * 100_000 + b"}}", registry)
    assert error.code is ErrorCode.BAD_JSON


def test_a_json_array_is_not_a_request(registry: KindRegistry) -> None:
    error = decode_error(b'[{"kind": "health"}]', registry)
    assert error.code is ErrorCode.SCHEMA
    assert "object" in error.message


# --- depth -----------------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize("opener,closer", [(b"[", b"]"), (b'{"a":', b"}")], ids=["arrays", "objects"])
def test_nesting_100000_deep_is_too_large(registry: KindRegistry, opener: bytes, closer: bytes) -> None:
    data = opener * 100_000 + b"1" + closer * 100_000
    error = decode_error(data, registry)
    assert error.code is ErrorCode.TOO_LARGE
    assert str(MAX_DEPTH) in error.message


def nested_arrays(depth: int, leaf: str) -> Any:
    """`depth` nested arrays (the outermost counts as level 1), the innermost holding `leaf` (or nothing)."""
    return json.loads("[" * depth + leaf + "]" * depth)


def test_the_depth_limit_is_32() -> None:
    assert MAX_DEPTH == 32


@pytest.mark.parametrize("leaf", ["", "1", '"s"'], ids=["empty", "number", "string"])
def test_depth_32_passes_the_limit_check(leaf: str) -> None:
    check_limits(nested_arrays(32, leaf))


def test_depth_33_with_a_value_inside_is_too_large() -> None:
    with pytest.raises(DlwatchdError) as info:
        check_limits(nested_arrays(33, "1"))
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.field == "[0]" * 32


@pytest.mark.parametrize("leaf", ["[]", "{}"])
def test_depth_33_with_an_empty_innermost_container_is_too_large(leaf: str) -> None:
    with pytest.raises(DlwatchdError) as info:
        check_limits(nested_arrays(32, leaf))
    assert info.value.code is ErrorCode.TOO_LARGE


def request_nested_in_meta(total_depth: int) -> dict[str, Any]:
    """A health request whose deepest container is at `total_depth` (the request object is level 1)."""
    inner: Any = {"a": 1}
    for _ in range(total_depth - 2):
        inner = {"a": inner}
    return {"kind": "health", "meta": inner}


def test_a_request_32_deep_is_accepted(registry: KindRegistry) -> None:
    assert decode_request(encode(request_nested_in_meta(32)), registry).kind == "health"


def test_a_request_33_deep_is_too_large_naming_the_field(registry: KindRegistry) -> None:
    error = decode_error(encode(request_nested_in_meta(33)), registry)
    assert error.code is ErrorCode.TOO_LARGE
    assert error.field is not None and error.field.startswith("meta.a.a")


def test_a_million_element_array_passes_the_parser_and_the_limit_check() -> None:
    data = b'{"kind": "health", "meta": {"a": [' + b",".join([b"0"] * 1_000_000) + b"]}}"
    obj = parse_json(data)
    check_limits(obj)
    assert len(obj["meta"]["a"]) == 1_000_000


# --- string limits ---------------------------------------------------------------------------


def test_a_string_of_exactly_1_mib_is_allowed() -> None:
    assert MAX_STRING == 1024 * 1024
    check_limits({"kind": "health", "meta": {"a": "x" * MAX_STRING}})


@pytest.mark.parametrize(
    "obj,field",
    [
        ({"kind": "health", "meta": {"note": "x" * (MAX_STRING + 1)}}, "meta.note"),
        ({"kind": "health", "meta": {"list": [1, 2, "x" * (MAX_STRING + 1)]}}, "meta.list[2]"),
        (infer_request(tiles=[{"id": "x" * (MAX_STRING + 1), "data": "a.png"}]), "tiles[0].id"),
        (infer_request(data="x" * (MAX_STRING + 1)), "data"),
        ({"kind": "health", "meta": {"tiles": [{"data": "x" * (MAX_STRING + 1)}]}}, "meta.tiles[0].data"),
    ],
    ids=["meta", "list-item", "tile-id", "top-level-data", "tiles-not-at-top"],
)
def test_a_string_over_1_mib_is_too_large_naming_the_field(
    registry: KindRegistry, obj: dict[str, Any], field: str
) -> None:
    error = decode_error(encode(obj), registry)
    assert error.code is ErrorCode.TOO_LARGE
    assert error.field == field
    assert f"'{field}'" in error.message


def test_inline_tile_data_may_exceed_1_mib(registry: KindRegistry) -> None:
    big = "data:image/png;base64," + "A" * (2 * MAX_STRING)
    body = infer_request(tiles=[{"id": "t1", "data": "a.png"}, {"id": "t2", "data": big}])
    decoded = decode_request(encode(body), registry)
    assert decoded.kind == "infer"
    assert decoded.raw["tiles"][1]["data"] == big


def test_an_object_key_over_1_mib_is_too_large(registry: KindRegistry) -> None:
    error = decode_error(encode({"kind": "health", "meta": {"k" * (2 * MAX_STRING): 1}}), registry)
    assert error.code is ErrorCode.TOO_LARGE
    assert len(error.message) < 1000


# --- protocol and kind -----------------------------------------------------------------------


def test_protocol_defaults_to_1_and_1_is_accepted(registry: KindRegistry) -> None:
    assert decode_request(b'{"kind": "health"}', registry).kind == "health"
    assert decode_request(b'{"protocol": 1, "kind": "health"}', registry).kind == "health"


@pytest.mark.parametrize("protocol", [2, 0, "1", True], ids=["2", "0", "string", "true"])
def test_another_protocol_is_e_protocol(registry: KindRegistry, protocol: Any) -> None:
    error = decode_error(encode({"protocol": protocol, "kind": "health"}), registry)
    assert error.code is ErrorCode.PROTOCOL
    assert error.field == "protocol"
    assert error.hint


def test_a_missing_kind_is_e_schema_listing_the_valid_kinds(registry: KindRegistry) -> None:
    error = decode_error(b'{"protocol": 1}', registry)
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "kind"
    for name in registry.names():
        assert name in error.message


def test_an_unknown_kind_is_e_schema_listing_the_valid_kinds(registry: KindRegistry) -> None:
    error = decode_error(b'{"kind": "classify"}', registry)
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "kind"
    assert "'classify'" in error.message
    for name in registry.names():
        assert name in error.message


# --- schema errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "obj,field",
    [
        ({"kind": "health", "bogus": 1}, "bogus"),
        (infer_request(tiles=[{"id": "t1", "data": "a.png", "bogus": 1}]), "tiles[0].bogus"),
        (infer_request(options={"bogus": 1}), "options.bogus"),
    ],
)
def test_an_unknown_field_is_e_schema_naming_its_path(registry: KindRegistry, obj: dict[str, Any], field: str) -> None:
    error = decode_error(encode(obj), registry)
    assert error.code is ErrorCode.SCHEMA
    assert error.field == field
    assert f"The field '{field}' is not part of a '{obj['kind']}' request" in error.message
    assert error.hint is not None and f"dlwatchd schema {obj['kind']}" in error.hint


def test_client_and_meta_are_free_objects(registry: KindRegistry) -> None:
    body = {"kind": "health", "client": {"name": "qupath", "version": "0.6"}, "meta": {"anything": [1, {}]}}
    decoded = decode_request(encode(body), registry)
    assert decoded.raw["client"] == body["client"]
    assert decoded.raw["meta"] == body["meta"]


def test_a_wrong_value_names_its_field(registry: KindRegistry) -> None:
    error = decode_error(encode(infer_request(options={"use_gpu": "maybe"})), registry)
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "options.use_gpu"
    assert error.message.startswith("The field 'options.use_gpu' is invalid: ")


def test_a_wrong_value_in_a_union_field_names_the_request_path(registry: KindRegistry) -> None:
    body = infer_request(input_config={"normalization": {"min": "low"}})
    error = decode_error(encode(body), registry)
    assert error.code is ErrorCode.SCHEMA
    assert error.field == "input_config.normalization.min"


def test_dotted_paths() -> None:
    assert dotted(()) == ""
    assert dotted(("training", "epochs")) == "training.epochs"
    assert dotted(["tiles", 2, "id"]) == "tiles[2].id"
    assert dotted([0, 1]) == "[0][1]"


def validation_error(model: type, obj: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(obj)
    return info.value


def test_schema_error_for_an_unknown_field() -> None:
    error = schema_error(validation_error(HealthRequest, {"kind": "health", "bogus": 1}), "health")
    assert error.code is ErrorCode.SCHEMA
    assert error.message == "The field 'bogus' is not part of a 'health' request."
    assert error.hint == "Check its spelling against `dlwatchd schema health`."
    assert error.field == "bogus"


def test_schema_error_for_missing_fields_counts_the_problems() -> None:
    error = schema_error(validation_error(LayersRequest, {"kind": "layers"}), "layers")
    assert error.message == "The field 'architecture' is required in a 'layers' request (2 problems in all)."
    assert error.hint is None
    assert error.field == "architecture"


def test_schema_error_for_an_invalid_value() -> None:
    exc = validation_error(
        LayersRequest, {"kind": "layers", "architecture": "unet", "encoder": "resnet18", "num_channels": 0}
    )
    error = schema_error(exc, "layers")
    assert error.message.startswith("The field 'num_channels' is invalid: ")
    assert error.message.endswith(".")
    assert "(" not in error.message  # one problem: no count
    assert error.field == "num_channels"


def test_a_valid_request_keeps_its_raw_object(registry: KindRegistry) -> None:
    body = {"kind": "layers", "architecture": "unet", "encoder": "resnet18"}
    decoded = decode_request(encode(body), registry)
    assert decoded.kind == "layers"
    assert decoded.raw == body
    assert isinstance(decoded.request, LayersRequest)
    assert decoded.request.num_channels == 3
