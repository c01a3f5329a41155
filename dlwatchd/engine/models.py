"""Model construction and pretrained-encoder loading (ENGINE §6.2, §6.4, §6.6).

Every path (training, layer listing, PyTorch inference) builds with `encoder_weights=None`, so nothing downloads;
pretrained weights come from the offline WeightsStore and are copied key by key with shape checks.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch

from dlwatchd.catalog.architectures import resolve_architecture
from dlwatchd.catalog.encoders import encoder_base, is_histology
from dlwatchd.engine.weights import MIN_COVERAGE, WeightsStore
from dlwatchd.errors import DlwatchdError, ErrorCode

MAX_LISTED_KEYS = 10


def create_model(architecture: str, encoder: str, in_channels: int, num_classes: int) -> torch.nn.Module:
    """A randomly initialised smp model: `architecture` (aliases, any case) on the smp base of `encoder`.

    Raises E_SCHEMA with field "model_type" for an unknown architecture, "architecture.backbone" for an encoder
    this smp cannot build (or cannot combine with the architecture).
    """
    try:
        entry = resolve_architecture(architecture)
    except DlwatchdError as error:
        raise DlwatchdError(ErrorCode.SCHEMA, error.message, hint=error.hint, field="model_type") from error
    if in_channels < 1 or num_classes < 1:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"A model needs at least one input channel and one class, not {in_channels} and {num_classes}.",
        )
    base = encoder_base(encoder)
    if not _smp_knows(base):
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The encoder '{encoder}' is not one segmentation_models_pytorch {smp.__version__} can build.",
            hint="Send an `encoders` query for the catalogue; other smp encoder names work too.",
            field="architecture.backbone",
        )
    model_class = getattr(smp, entry.smp_class)
    try:
        return model_class(encoder_name=base, encoder_weights=None, in_channels=in_channels, classes=num_classes)
    except (KeyError, ValueError) as exc:  # smp's word for "this encoder does not fit this architecture"
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The architecture '{entry.name}' cannot be built on the encoder '{encoder}': {exc}",
            field="architecture.backbone",
        ) from exc


def adapt_stem_weight(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A 3-channel stem conv weight (out×3×kh×kw) adapted to `in_channels` the way smp does (ENGINE §6.6).

    K = 1: the sum over the input axis; K >= 2: input channel i takes W[:, i % 3], then everything × 3/K.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    index = torch.arange(in_channels, device=weight.device) % 3
    return weight[:, index] * (3.0 / in_channels)


def find_stem_key(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], in_channels: int) -> str | None:
    """The first conv weight of the encoder that takes `in_channels` here and 3 channels in `source`.

    That is `conv1.weight` for the ResNet family and the histology encoders; None when K is 3 or nothing fits.
    """
    if in_channels == 3:
        return None
    for key, value in target.items():
        other = source.get(key)
        if value.dim() != 4 or other is None or other.dim() != 4 or value.shape[1] != in_channels:
            continue
        if other.shape[1] == 3 and other.shape[0] == value.shape[0] and other.shape[2:] == value.shape[2:]:
            return key
    return None


def load_pretrained_encoder(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], in_channels: int) -> list[str]:
    """Copy every tensor of `model.encoder` found in `state_dict` with an equal shape; adapt the stem when K != 3.

    Returns warnings (one listing up to 10 missing keys when 50-99% were copied, else none).
    Raises E_SCHEMA, leaving the model untouched, when fewer than half of the encoder's tensors fit.
    """
    encoder = model.get_submodule("encoder")
    target = encoder.state_dict()
    stem = find_stem_key(target, state_dict, in_channels)
    copied: dict[str, torch.Tensor] = {}
    for key, value in target.items():
        source = state_dict.get(key)
        if source is None:
            continue
        if key == stem:
            copied[key] = adapt_stem_weight(source.to(torch.float32), in_channels)
        elif source.shape == value.shape:
            copied[key] = source
    missing = [key for key in target if key not in copied]
    if len(copied) < MIN_COVERAGE * len(target):
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The pretrained weights do not fit the encoder: only {len(copied)} of its {len(target)} tensors match "
            f"by name and shape (missing e.g. {', '.join(missing[:MAX_LISTED_KEYS])}).",
            hint="Re-import weights made for this encoder, or set use_pretrained to false.",
            field="architecture.backbone",
        )
    # strict=False because missing keys are allowed (and reported below); shapes were checked above.
    encoder.load_state_dict(copied, strict=False)
    if not missing:
        return []
    more = f" and {len(missing) - MAX_LISTED_KEYS} more" if len(missing) > MAX_LISTED_KEYS else ""
    return [
        f"{len(missing)} of the encoder's {len(target)} tensors were not in the pretrained weights and stay "
        f"randomly initialised: {', '.join(missing[:MAX_LISTED_KEYS])}{more}."
    ]


def build_model(
    architecture: str,
    encoder: str,
    in_channels: int,
    num_classes: int,
    *,
    use_pretrained: bool,
    store: WeightsStore,
) -> tuple[torch.nn.Module, list[str]]:
    """create_model, then (when use_pretrained) the encoder's local weights loaded; returns (model, warnings).

    Raises E_WEIGHTS_UNAVAILABLE at once, without any network access, when no local weights exist, and
    the errors of create_model and load_pretrained_encoder.
    """
    model = create_model(architecture, encoder, in_channels, num_classes)
    if use_pretrained:
        return model, load_pretrained_encoder(model, store.load(encoder), in_channels)
    if is_histology(encoder):
        return model, [
            f"use_pretrained is false, so the histology encoder '{encoder}' is a randomly initialised ResNet-50 "
            "without its histology weights."
        ]
    return model, []


def _smp_knows(base: str) -> bool:
    if base.startswith("tu-"):
        import timm

        return bool(timm.is_model(base[3:].split(".")[0]))
    return base in smp.encoders.encoders
