"""Query kinds answered by the query lane's worker."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dlwatchd.jobs.context import JobContext


def run_gpu(ctx: JobContext, request: BaseModel) -> dict[str, Any]:
    """The `gpu` kind: device info of the device this daemon's workers use."""
    from dlwatchd.engine.device import device_info

    return device_info()
