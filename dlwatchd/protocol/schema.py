"""JSON Schemas of the requests, status.json and the daemon health, as published to client authors."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dlwatchd.errors import DlwatchdError, ErrorCode


def schema_for(name: str | None) -> dict[str, Any]:
    """The JSON Schema of one request kind, of 'status' or 'health', or of every request (None).

    Raises DlwatchdError(E_NOT_FOUND) listing the valid names.
    """
    from dlwatchd.protocol.requests import REQUEST_MODELS, request_adapter
    from dlwatchd.protocol.status import DaemonHealth, JobStatus

    if name is None:
        return request_adapter().json_schema()
    documents: dict[str, type[BaseModel]] = {"status": JobStatus, "health": DaemonHealth, **REQUEST_MODELS}
    if name not in documents:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"There is no schema named '{name}'; valid names are: {', '.join(sorted(documents))}.",
        )
    return documents[name].model_json_schema()
