"""Turning request bytes into a validated request: the same checks and errors for the daemon and `validate`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from dlwatchd.errors import DlwatchdError, ErrorCode

if TYPE_CHECKING:
    from dlwatchd.jobs._registry import KindRegistry

MAX_REQUEST_BYTES = 32 * 1024 * 1024
MAX_DEPTH = 32
MAX_STRING = 1024 * 1024
PROTOCOL_VERSION = 1


class JsonSyntaxError(DlwatchdError):
    """E_BAD_JSON with the 1-based line and column of the fault."""

    def __init__(self, message: str, line: int | None = None, column: int | None = None) -> None:
        where = f" at line {line}, column {column}" if line else ""
        super().__init__(
            ErrorCode.BAD_JSON,
            f"The request is not valid JSON{where}: {message}.",
            hint="Write the request with a JSON library, to a temporary name, and rename it into incoming/.",
        )
        self.line = line
        self.column = column


@dataclass(frozen=True)
class DecodedRequest:
    kind: str
    request: BaseModel
    raw: dict[str, Any]


def _refuse_constant(name: str) -> Any:
    raise JsonSyntaxError(f"the literal {name} is not allowed (JSON numbers must be finite)")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JsonSyntaxError(f"the key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def parse_json(data: bytes, max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """Parse request bytes strictly: size cap, UTF-8 (a BOM is tolerated), no NaN, no duplicate keys.

    Raises DlwatchdError E_TOO_LARGE or JsonSyntaxError (E_BAD_JSON with line and column).
    """
    if len(data) > max_bytes:
        raise DlwatchdError(
            ErrorCode.TOO_LARGE,
            f"The request file is {len(data)} bytes; the limit is {max_bytes} bytes.",
            hint="Stage large inputs as files under inputs/<id>/ and refer to them by path.",
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise JsonSyntaxError(f"byte {exc.start} is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise JsonSyntaxError(exc.msg.lower(), exc.lineno, exc.colno) from None
    except RecursionError:
        raise DlwatchdError(
            ErrorCode.TOO_LARGE,
            f"The request nests deeper than the limit of {MAX_DEPTH} levels.",
        ) from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's digit limit
        raise JsonSyntaxError(str(exc).rstrip(".")) from None


def _is_tile_data(path: tuple[Any, ...]) -> bool:
    return len(path) == 3 and path[0] == "tiles" and path[2] == "data"


def check_limits(obj: Any) -> None:
    """Depth <= 32 and strings <= 1 MiB (inline tile data excepted); raises E_TOO_LARGE naming the field."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, (dict, list)) and len(path) + 1 > MAX_DEPTH:
            raise DlwatchdError(
                ErrorCode.TOO_LARGE,
                f"The request nests deeper than the limit of {MAX_DEPTH} levels.",
                field=dotted(path),
            )
        if isinstance(value, dict):
            for key in value:
                _check_string(key, path, is_key=True)
            stack.extend((item, (*path, key)) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, path, is_key=False)


def _check_string(value: str, path: tuple[Any, ...], *, is_key: bool) -> None:
    """Strings and keys: at most 1 MiB (inline tile data excepted) and encodable as UTF-8 (no lone surrogates)."""
    where = dotted(path) or "the request"
    if len(value) > MAX_STRING and (is_key or not _is_tile_data(path)):
        what = f"A key in '{where}'" if is_key else f"The field '{where}'"
        raise DlwatchdError(
            ErrorCode.TOO_LARGE,
            f"{what} holds {len(value)} characters; the limit is {MAX_STRING}.",
            field=dotted(path) or None,
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonSyntaxError(f"a string in '{where}' holds an unpaired surrogate escape (\\ud800-\\udfff)") from None


def dotted(path: tuple[Any, ...] | list[Any]) -> str:
    """A field path as clients read it: `training.epochs`, `tiles[2].id`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def request_path(loc: tuple[Any, ...], raw: Any) -> list[Any]:
    """The part of a pydantic error location that names places in the request itself.

    Pydantic adds labels of union members (`constrained-float`, `list[float]`) to locations; those are
    dropped, and the path stops at the first part the request does not have (e.g. a missing field).
    """
    path: list[Any] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str):
            path.append(part)
            if part not in node:
                break
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            path.append(part)
            node = node[part]
        elif not isinstance(node, (dict, list)):
            break
    return path


def schema_error(exc: ValidationError, kind: str, raw: Any = None) -> DlwatchdError:
    """The E_SCHEMA error for the first problem pydantic found, naming the field path."""
    first = exc.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    path = dotted(request_path(loc, raw) if raw is not None else list(loc))
    extra = f" ({len(exc.errors())} problems in all)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        message = f"The field '{path}' is not part of a '{kind}' request{extra}."
        hint = "Check its spelling against `dlwatchd schema " + kind + "`."
    elif first["type"] == "missing":
        message = f"The field '{path}' is required in a '{kind}' request{extra}."
        hint = None
    else:
        message = f"The field '{path}' is invalid: {first['msg']}{extra}."
        hint = None
    return DlwatchdError(ErrorCode.SCHEMA, message, hint=hint, field=path or None)


def decode_request(data: bytes, registry: KindRegistry, max_bytes: int = MAX_REQUEST_BYTES) -> DecodedRequest:
    """Bytes to a validated request model of its kind.

    Raises DlwatchdError: E_TOO_LARGE, E_BAD_JSON, E_PROTOCOL (unknown protocol version) or E_SCHEMA.
    """
    obj = parse_json(data, max_bytes)
    check_limits(obj)
    if not isinstance(obj, dict):
        raise DlwatchdError(ErrorCode.SCHEMA, "A request must be a JSON object.")
    protocol = obj.get("protocol", PROTOCOL_VERSION)
    if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
        raise DlwatchdError(
            ErrorCode.PROTOCOL,
            f"The request speaks protocol {protocol!r}; this dlwatchd speaks protocol {PROTOCOL_VERSION}.",
            hint="Update the client or the daemon so that both speak the same protocol.",
            field="protocol",
        )
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The field 'kind' is required; valid kinds are: {', '.join(registry.names())}.",
            field="kind",
        )
    model = registry.get(kind).request_model
    try:
        request = model.model_validate(obj)
    except ValidationError as exc:
        raise schema_error(exc, kind, obj) from None
    return DecodedRequest(kind=kind, request=request, raw=obj)
