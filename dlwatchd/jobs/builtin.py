"""The protocol's request kinds (PROTOCOL.md section 3) and where each one runs."""

from __future__ import annotations

from dlwatchd.jobs._registry import JobKind, KindRegistry
from dlwatchd.protocol import requests as rq

SUPERVISOR_KINDS = ("health", "gpu-clear")


def register_builtin_kinds(registry: KindRegistry) -> None:
    """Register every protocol kind; a kind whose engine is not in this version has no handler."""
    for kind in (
        JobKind("train", rq.TrainRequest, "train", None, on_interrupt="resume"),
        JobKind("infer", rq.InferRequest, "infer", None),
        JobKind("infer-pixel", rq.InferPixelRequest, "infer", None),
        JobKind("gpu-clear", rq.GpuClearRequest, None, None, on_interrupt="fail", max_attempts=1),
        JobKind("health", rq.HealthRequest, None, None),
        JobKind("gpu", rq.GpuRequest, "query", "dlwatchd.jobs.queries:run_gpu"),
        JobKind("models", rq.ModelsRequest, "query", None),
        JobKind("encoders", rq.EncodersRequest, "query", None),
        JobKind("architectures", rq.ArchitecturesRequest, "query", None),
        JobKind("encoder-info", rq.EncoderInfoRequest, "query", None),
        JobKind("architecture-info", rq.ArchitectureInfoRequest, "query", None),
        JobKind("layers", rq.LayersRequest, "query", None),
        JobKind("freeze-recommendations", rq.FreezeRecommendationsRequest, "query", None),
    ):
        registry.register(kind)
