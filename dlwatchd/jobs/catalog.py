"""Catalogue query kinds: encoders, architectures, their info, layers and freeze recommendations.

Every handler but `run_layers` is pure data and imports no torch, not even when called, so the
supervisor may answer them itself; `run_layers` builds a real smp model (no weights, no network).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlwatchd.catalog.architectures import (
    ArchitectureEntry,
    architecture_answer,
    list_architectures,
    resolve_architecture,
)
from dlwatchd.catalog.encoders import encoder_answer, encoder_base, get_encoder, list_encoders, weights_tag
from dlwatchd.catalog.freeze import freeze_recommendations
from dlwatchd.catalog.layers import layer_groups
from dlwatchd.errors import DlwatchdError, ErrorCode

if TYPE_CHECKING:
    from dlwatchd.jobs.context import JobContext
    from dlwatchd.protocol.requests import (
        ArchitectureInfoRequest,
        ArchitecturesRequest,
        EncoderInfoRequest,
        EncodersRequest,
        FreezeRecommendationsRequest,
        LayersRequest,
    )

WEIGHT_SUFFIXES = (".safetensors", ".pth")


def weights_available(weights_dir: Path, encoder: str) -> bool:
    """True when the local weights store holds `<encoder>/<tag>.safetensors` (or `.pth`).

    Only the store is consulted (ENGINE.md section 6.5, step 1); the weights-store module is meant
    to replace this rule wholesale.
    """
    stem = weights_dir / encoder / weights_tag(encoder)
    return any(stem.with_suffix(suffix).is_file() for suffix in WEIGHT_SUFFIXES)


def run_encoders(ctx: JobContext, request: EncodersRequest) -> dict[str, Any]:
    """The `encoders` kind: the whole catalogue in reference order, with local weight availability."""
    return {
        "encoders": [encoder_answer(entry, weights_available(ctx.weights_dir, entry.name)) for entry in list_encoders()]
    }


def run_encoder_info(ctx: JobContext, request: EncoderInfoRequest) -> dict[str, Any]:
    """The `encoder-info` kind: one encoder; an unknown name is E_NOT_FOUND."""
    entry = get_encoder(request.name)
    return encoder_answer(entry, weights_available(ctx.weights_dir, entry.name))


def run_architectures(ctx: JobContext, request: ArchitecturesRequest) -> dict[str, Any]:
    """The `architectures` kind: every registered architecture in catalogue order."""
    return {"architectures": [architecture_answer(entry) for entry in list_architectures()]}


def run_architecture_info(ctx: JobContext, request: ArchitectureInfoRequest) -> dict[str, Any]:
    """The `architecture-info` kind: one architecture, aliases resolved; an unknown name is E_NOT_FOUND."""
    return architecture_answer(resolve_architecture(request.name))


def run_freeze_recommendations(ctx: JobContext, request: FreezeRecommendationsRequest) -> dict[str, Any]:
    """The `freeze-recommendations` kind (ENGINE.md section 7.3)."""
    return freeze_recommendations(request.dataset_size, request.encoder)


def run_layers(ctx: JobContext, request: LayersRequest) -> dict[str, Any]:
    """The `layers` kind: the freezable groups of a model built without weights (ENGINE.md section 7.1).

    Raises DlwatchdError(E_SCHEMA) naming the value when the architecture is not in the catalogue
    (field "architecture") or smp cannot build the encoder (field "encoder").
    """
    try:
        entry = resolve_architecture(request.architecture)
    except DlwatchdError as exc:
        # The request schema accepts a few names the catalogue does not build yet; to the client this
        # is an invalid request, not a missing resource.
        raise DlwatchdError(ErrorCode.SCHEMA, exc.message, hint=exc.hint, field="architecture") from None
    model = _build_model(entry, request.encoder, request.num_channels, request.num_classes)
    return {"layers": layer_groups(model, request.encoder)}


def _build_model(entry: ArchitectureEntry, encoder: str, in_channels: int, classes: int) -> Any:
    import segmentation_models_pytorch as smp

    base = encoder_base(encoder)
    if not _smp_knows(base):
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Unknown encoder {encoder!r}: segmentation_models_pytorch has no encoder of that name.",
            hint="Send an `encoders` query for the catalogue; other smp encoder names work too.",
            field="encoder",
        )
    model_class = getattr(smp, entry.smp_class)
    try:
        return model_class(encoder_name=base, encoder_weights=None, in_channels=in_channels, classes=classes)
    except (KeyError, ValueError, RuntimeError) as exc:
        # smp rejects some encoder/architecture pairs (e.g. depth or dilation limits) with these.
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"Cannot build {entry.display_name} with encoder {encoder!r}: {exc}.",
            field="encoder",
        ) from exc


def _smp_knows(base: str) -> bool:
    """True when smp has the encoder `base`, or timm has the model behind a `tu-` name."""
    from segmentation_models_pytorch.encoders import get_encoder_names

    if base in get_encoder_names():
        return True
    if base.startswith("tu-"):
        import timm

        return bool(timm.is_model(base[3:]))
    return False
