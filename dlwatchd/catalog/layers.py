"""Freezable layer groups of a built model (ENGINE.md sections 7.1 and 7.2).

Works on any object shaped like a torch module (`named_children`, `children`, `parameters`), so
this module imports no torch: the caller builds the model and passes it in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from dlwatchd.catalog.encoders import encoder_family, is_histology


@dataclass(frozen=True)
class GroupSpec:
    """One encoder layer group of a family: layer-group name, display suffix, depth, reference freeze flag."""

    name: str
    suffix: str
    depth: int
    recommended_freeze: bool


def _specs(*rows: tuple[str, str, int, bool]) -> tuple[GroupSpec, ...]:
    return tuple(GroupSpec(*row) for row in rows)


_RESNET = _specs(
    ("encoder.conv1", "Initial Conv", 0, True),
    ("encoder.layer1", "Block 1 (64 filters)", 1, True),
    ("encoder.layer2", "Block 2 (128 filters)", 2, True),
    ("encoder.layer3", "Block 3 (256 filters)", 3, False),
    ("encoder.layer4", "Block 4 (512 filters)", 4, False),
)
# The display names are the reference's text, kept even where the filter counts are wrong
# (bottleneck ResNets): clients match on them.
FAMILY_GROUPS: dict[str, tuple[GroupSpec, ...]] = {
    "resnet": _RESNET,
    "se_resnet": (GroupSpec("encoder.layer0", "Initial Conv", 0, True), *_RESNET[1:]),
    "efficientnet": _specs(
        ("encoder._conv_stem", "Stem Conv", 0, True),
        ("encoder._blocks[0:4]", "Blocks 0-3", 1, True),
        ("encoder._blocks[4:10]", "Blocks 4-9", 2, True),
        ("encoder._blocks[10:18]", "Blocks 10-17", 3, False),
        ("encoder._blocks[18:]", "Blocks 18+", 4, False),
    ),
    "densenet": _specs(
        ("encoder.features.conv0", "Initial Conv", 0, True),
        ("encoder.features.denseblock1", "Dense Block 1", 1, True),
        ("encoder.features.denseblock2", "Dense Block 2", 2, True),
        ("encoder.features.denseblock3", "Dense Block 3", 3, False),
        ("encoder.features.denseblock4", "Dense Block 4", 4, False),
    ),
    "vgg": _specs(
        ("encoder.features[0:7]", "Layers 1-2 (64 filters)", 0, True),
        ("encoder.features[7:14]", "Layers 3-4 (128 filters)", 1, True),
        ("encoder.features[14:24]", "Layers 5-7 (256 filters)", 2, True),
        ("encoder.features[24:34]", "Layers 8-10 (512 filters)", 3, False),
        ("encoder.features[34:]", "Layers 11-13 (512 filters)", 4, False),
    ),
    "mobilenet": _specs(
        ("encoder.features[0:2]", "Initial Conv", 0, True),
        ("encoder.features[2:5]", "Blocks 1-3", 1, True),
        ("encoder.features[5:9]", "Blocks 4-7", 2, True),
        ("encoder.features[9:14]", "Blocks 8-12", 3, False),
        ("encoder.features[14:]", "Blocks 13+", 4, False),
    ),
}
# Encoders outside the catalogue: names that resolve to nothing, so freezing them only warns.
PLACEHOLDER_GROUPS = _specs(
    ("encoder.layer_early", "Early Layers", 0, True),
    ("encoder.layer_mid", "Middle Layers", 2, False),
    ("encoder.layer_late", "Late Layers", 4, False),
)
_HEADS = (("decoder", "Decoder (all layers)", 5), ("segmentation_head", "Segmentation Head", 6))

_IMAGENET_DESCRIPTIONS = {
    0: "Generic edge and colour detectors from ImageNet; worth freezing.",
    1: "Generic low-level textures from ImageNet; worth freezing.",
    2: "Mid-level patterns; freeze for small datasets, train otherwise.",
    3: "Higher-level features that should adapt to your images; train.",
    4: "The most task-specific encoder features; train.",
}
_HISTOLOGY_DESCRIPTIONS = {
    0: "Tissue-specific low-level features; safe to freeze.",
    1: "Tissue-specific textures; safe to freeze unless the dataset is large.",
    2: "Tissue-specific mid-level patterns; freeze only for small datasets.",
    3: "Tissue-specific high-level features; usually trained.",
    4: "The deepest tissue-specific features; usually trained.",
}
_PLACEHOLDER_DESCRIPTION = "Placeholder: this encoder's layers are not catalogued, so freezing this group does nothing."
_HEAD_DESCRIPTIONS = {
    "decoder": "Decoder layers that turn encoder features into a full-resolution map; always trained.",
    "segmentation_head": "Final layer producing one logit per class and pixel; always trained.",
}
_SLICE = re.compile(r"^(\w+)\[(-?\d*):(-?\d*)\]$")


def _is_sequence(module: Any) -> bool:
    # By class name so that this module needs no torch import; subclasses count too.
    return any(cls.__name__ in ("Sequential", "ModuleList") for cls in type(module).__mro__)


def _child(module: Any, part: str) -> Any | None:
    """The sub-module `part` of `module` (a numeric part indexes a Sequential/ModuleList), or None."""
    children = dict(module.named_children())
    if part in children:
        return children[part]
    if part.lstrip("-").isdigit() and _is_sequence(module):
        ordered = list(children.values())
        index = int(part)
        if -len(ordered) <= index < len(ordered):
            return ordered[index]
    return None


def resolve_group(model: Any, name: str) -> list[Any]:
    """The modules a layer-group name selects (ENGINE.md section 7.2).

    Dotted parts walk sub-modules from the model root (so `encoder.<path>` resolves from
    `model.encoder`); a final `attr[a:b]` selects children a..b-1 of `attr` by Python slice
    rules. `encoder.conv1` falls back to `encoder.layer0` for SE-ResNets. Returns [] for a name
    that does not resolve or an empty slice; callers warn about those.
    """
    parts = name.split(".")
    if not name or any(not part for part in parts):
        return []
    last = _SLICE.match(parts[-1])
    path = parts[:-1] + [last.group(1)] if last else parts
    module: Any = model
    for part in path:
        module = _child(module, part)
        if module is None:
            return [] if name != "encoder.conv1" else resolve_group(model, "encoder.layer0")
    if last is None:
        return [module]
    start, stop = (int(bound) if bound else None for bound in last.group(2, 3))
    return list(module.children())[start:stop]


def count_parameters(modules: list[Any]) -> int:
    """The number of parameter elements in `modules`, each shared parameter counted once."""
    seen: dict[int, int] = {}
    for module in modules:
        for parameter in module.parameters():
            seen[id(parameter)] = parameter.numel()
    return sum(seen.values())


def layer_groups(model: Any, encoder_name: str) -> list[dict[str, Any]]:
    """The `layers` answer: the encoder groups of the encoder's family, then decoder and head.

    Each group is `{name, display_name, param_count, is_encoder, depth, recommended_freeze,
    description}`; `param_count` is 0 for a name that does not resolve in `model` (an empty
    slice, or the placeholder groups of an encoder outside the catalogue).
    """
    family = encoder_family(encoder_name)
    specs = FAMILY_GROUPS.get(family, PLACEHOLDER_GROUPS)
    if family not in FAMILY_GROUPS:
        descriptions = dict.fromkeys(range(5), _PLACEHOLDER_DESCRIPTION)
    else:
        descriptions = _HISTOLOGY_DESCRIPTIONS if is_histology(encoder_name) else _IMAGENET_DESCRIPTIONS
    groups = [
        {
            "name": spec.name,
            "display_name": f"Encoder: {spec.suffix}",
            "param_count": count_parameters(resolve_group(model, spec.name)),
            "is_encoder": True,
            "depth": spec.depth,
            "recommended_freeze": spec.recommended_freeze,
            "description": descriptions[spec.depth],
        }
        for spec in specs
    ]
    present = dict(model.named_children())
    for name, display, depth in _HEADS:
        if name in present:
            groups.append(
                {
                    "name": name,
                    "display_name": display,
                    "param_count": count_parameters([present[name]]),
                    "is_encoder": False,
                    "depth": depth,
                    "recommended_freeze": False,
                    "description": _HEAD_DESCRIPTIONS[name],
                }
            )
    return groups
