"""Query kinds answered by the query lane's worker."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from dlwatchd.jobs.context import JobContext


def run_gpu(ctx: JobContext, request: BaseModel) -> dict[str, Any]:
    """The `gpu` kind: device info of the device this daemon's workers use."""
    from dlwatchd.engine.device import device_info

    return device_info()


def run_models(ctx: JobContext, request: BaseModel) -> dict[str, Any]:
    """The `models` kind: the models in the spool's models/ and in the configured model folders."""
    from dlwatchd.artifacts.model_store import list_models

    return list_models(ctx.model_dirs).answer()
