"""The architecture catalogue (ENGINE.md section 6.1), filled by `register_architecture`.

Pure data: importing this module imports no torch or smp. Names resolve in any letter case
and through the aliases `unet++` and `deeplabv3+`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode


@dataclass(frozen=True)
class ArchitectureEntry:
    """One architecture: its smp class and what the catalogue queries report about it.

    `size_divisor` is the factor input sides must be padded to at inference (ENGINE.md section 12.4).
    """

    name: str
    display_name: str
    smp_class: str
    description: str
    decoder_channels: tuple[int, ...]
    supports_aux_output: bool
    aliases: tuple[str, ...] = ()
    size_divisor: int = 32


_ARCHITECTURES: dict[str, ArchitectureEntry] = {}
# Lower-cased names and aliases -> canonical name; kept beside the registry so lookups stay O(1).
_LOOKUP: dict[str, str] = {}


def register_architecture(entry: ArchitectureEntry) -> ArchitectureEntry:
    """Add `entry` to the catalogue (listing order is registration order).

    Raises ValueError when its name or one of its aliases is already taken.
    """
    keys = [entry.name.lower(), *(alias.lower() for alias in entry.aliases)]
    taken = [key for key in keys if key in _LOOKUP]
    if taken:
        raise ValueError(f"architecture name(s) {', '.join(taken)} already registered")
    _ARCHITECTURES[entry.name] = entry
    _LOOKUP.update(dict.fromkeys(keys, entry.name))
    return entry


def list_architectures(pattern: str = "*") -> list[ArchitectureEntry]:
    """Registered architectures whose name matches the fnmatch `pattern`, in catalogue order."""
    return [entry for name, entry in _ARCHITECTURES.items() if fnmatch.fnmatchcase(name, pattern)]


def accepted_architecture_names() -> list[str]:
    """Every name `resolve_architecture` accepts: the canonical names, then the aliases."""
    entries = list(_ARCHITECTURES.values())
    return [entry.name for entry in entries] + [alias for entry in entries for alias in entry.aliases]


def resolve_architecture(name: str) -> ArchitectureEntry:
    """The entry named `name` in any letter case, aliases resolved.

    Raises DlwatchdError(E_NOT_FOUND) naming it and listing the accepted names.
    """
    canonical = _LOOKUP.get(name.strip().lower())
    if canonical is None:
        raise DlwatchdError(
            ErrorCode.NOT_FOUND,
            f"Unknown architecture {name!r}; accepted names are: {', '.join(accepted_architecture_names())}.",
            hint="Send an `architectures` query for the catalogue with details of each architecture.",
            field="name",
        )
    return _ARCHITECTURES[canonical]


def canonical_architecture_name(name: str) -> str:
    """The canonical name of `name`; raises like `resolve_architecture`."""
    return resolve_architecture(name).name


def architecture_answer(entry: ArchitectureEntry) -> dict[str, Any]:
    """The JSON object of one architecture in the catalogue answers (ENGINE.md section 14)."""
    return {
        "name": entry.name,
        "display_name": entry.display_name,
        "description": entry.description,
        "decoder_channels": list(entry.decoder_channels),
        "supports_aux_output": entry.supports_aux_output,
    }


# The reference eight in the reference order, then `pan`. smp 0.6's UPerNet, Segformer and DPT are
# not registered: their divisors and encoder constraints have not been checked in this version.
for _entry in (
    ArchitectureEntry(
        "unet",
        "U-Net",
        "Unet",
        "Encoder-decoder whose skip connections concatenate encoder features into each upsampling stage.",
        (256, 128, 64, 32, 16),
        False,
    ),
    ArchitectureEntry(
        "unetplusplus",
        "U-Net++",
        "UnetPlusPlus",
        "U-Net with nested, densely connected skip pathways that narrow the gap between encoder and decoder.",
        (256, 128, 64, 32, 16),
        True,
        aliases=("unet++",),
    ),
    ArchitectureEntry(
        "deeplabv3",
        "DeepLab V3",
        "DeepLabV3",
        "Atrous spatial pyramid pooling over the deepest features for multi-scale context at coarse resolution.",
        (256,),
        False,
    ),
    ArchitectureEntry(
        "deeplabv3plus",
        "DeepLab V3+",
        "DeepLabV3Plus",
        "DeepLab V3 plus a light decoder that sharpens boundaries with early high-resolution features.",
        (256, 48),
        False,
        aliases=("deeplabv3+",),
    ),
    ArchitectureEntry(
        "fpn",
        "Feature Pyramid Network",
        "FPN",
        "Top-down feature pyramid that merges predictions from several scales, good for objects of mixed size.",
        (256, 256, 256, 256),
        False,
    ),
    ArchitectureEntry(
        "pspnet",
        "PSPNet",
        "PSPNet",
        "Pyramid pooling over the deepest features to capture global scene context; fast, coarse outputs.",
        (512,),
        False,
    ),
    ArchitectureEntry(
        "manet",
        "MA-Net",
        "MAnet",
        "U-Net-style decoder with position and channel attention blocks that weight the fused features.",
        (256, 128, 64, 32, 16),
        False,
    ),
    ArchitectureEntry(
        "linknet",
        "LinkNet",
        "Linknet",
        "Lightweight encoder-decoder that adds (not concatenates) encoder features, for fast inference.",
        (256, 128, 64, 32),
        False,
    ),
    ArchitectureEntry(
        "pan",
        "PAN",
        "PAN",
        "Pyramid attention network: feature pyramid attention plus global attention upsampling on a small decoder.",
        (32,),
        False,
    ),
):
    register_architecture(_entry)
del _entry
