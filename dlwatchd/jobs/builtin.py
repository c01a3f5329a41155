"""The protocol's request kinds (PROTOCOL.md section 3) and where each one runs."""

from __future__ import annotations

from dlwatchd.jobs._registry import JobKind, KindRegistry
from dlwatchd.protocol import requests as rq

QUERIES = "dlwatchd.jobs.queries"
CATALOG = "dlwatchd.jobs.catalog"
INFER = "dlwatchd.jobs.infer"


def register_builtin_kinds(registry: KindRegistry) -> None:
    """Register every protocol kind; a kind whose engine is not in this version has no handler."""
    for kind in (
        JobKind("train", rq.TrainRequest, "train", "dlwatchd.jobs.train:run_train", on_interrupt="resume"),
        JobKind("infer", rq.InferRequest, "infer", f"{INFER}:run_infer", group_handler=f"{INFER}:run_infer_group"),
        JobKind(
            "infer-pixel", rq.InferPixelRequest, "infer", f"{INFER}:run_infer", group_handler=f"{INFER}:run_infer_group"
        ),
        JobKind("gpu-clear", rq.GpuClearRequest, None, None, on_interrupt="fail", max_attempts=1),
        JobKind("health", rq.HealthRequest, None, None),
        JobKind("gpu", rq.GpuRequest, "query", f"{QUERIES}:run_gpu"),
        JobKind("models", rq.ModelsRequest, "query", f"{QUERIES}:run_models"),
        JobKind("layers", rq.LayersRequest, "query", f"{CATALOG}:run_layers"),
        # Pure catalogue answers: the supervisor gives them itself, in microseconds, with no torch.
        JobKind("encoders", rq.EncodersRequest, None, f"{CATALOG}:run_encoders"),
        JobKind("architectures", rq.ArchitecturesRequest, None, f"{CATALOG}:run_architectures"),
        JobKind("encoder-info", rq.EncoderInfoRequest, None, f"{CATALOG}:run_encoder_info"),
        JobKind("architecture-info", rq.ArchitectureInfoRequest, None, f"{CATALOG}:run_architecture_info"),
        JobKind(
            "freeze-recommendations", rq.FreezeRecommendationsRequest, None, f"{CATALOG}:run_freeze_recommendations"
        ),
    ):
        registry.register(kind)
