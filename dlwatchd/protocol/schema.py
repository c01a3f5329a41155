"""JSON Schemas of the requests, status.json and the daemon health, as published to client authors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dlwatchd.errors import DlwatchdError, ErrorCode


def schema_for(name: str | None) -> dict[str, Any]:
    """The JSON Schema of one request kind, of 'status', of 'heartbeat' (a daemon's health), or of every request.

    `None` means every request (the union on `kind`). The daemon's health record is named 'heartbeat' because
    `health` is the request kind that asks for it.

    Raises DlwatchdError(E_NOT_FOUND) listing the valid names.
    """
    from dlwatchd.protocol.requests import REQUEST_MODELS, request_adapter
    from dlwatchd.protocol.status import DaemonHealth, JobStatus

    if name is None:
        return request_adapter().json_schema()
    documents: dict[str, type[BaseModel]] = {**REQUEST_MODELS, "status": JobStatus, "heartbeat": DaemonHealth}
    if name not in documents:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"There is no schema named '{name}'; valid names are: {', '.join(sorted(documents))}.",
        )
    return documents[name].model_json_schema()
