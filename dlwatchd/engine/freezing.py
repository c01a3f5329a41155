"""Layer freezing (ENGINE.md section 7.2): exactly the named groups, slices included, nothing more."""

from __future__ import annotations

import torch

from dlwatchd.catalog.layers import resolve_group

# Stems that must learn when the input is not 3-channel: their weights were adapted, not learned.
_STEM_NAMES = ("encoder.conv1", "encoder.layer0", "encoder._conv_stem", "encoder.features.conv0")


def _is_stem(name: str) -> bool:
    return name in _STEM_NAMES or name.startswith("encoder.features[0:")


def apply_freezing(model: torch.nn.Module, names: list[str] | None, in_channels: int) -> tuple[list[str], list[str]]:
    """Set requires_grad=False on the named groups; returns (applied names, warnings).

    An unresolvable name or an empty slice gives a warning and freezes nothing; a stem is not frozen
    when the model sees other than 3 channels. Call again after every checkpoint load, because
    load_state_dict does not restore requires_grad. BatchNorm layers keep their train mode.
    """
    applied: list[str] = []
    warnings: list[str] = []
    for name in names or []:
        if in_channels != 3 and _is_stem(name):
            warnings.append(
                f"The layer group '{name}' was not frozen: with {in_channels} input channels the stem must learn."
            )
            continue
        modules = resolve_group(model, name)
        parameters = [p for module in modules for p in module.parameters()]
        if not parameters:
            warnings.append(
                f"The layer group '{name}' does not exist in this model or holds no parameters; "
                "nothing was frozen for it."
            )
            continue
        for parameter in parameters:
            parameter.requires_grad_(False)
        applied.append(name)
    return applied, warnings


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer gets: frozen ones are left out entirely."""
    return [p for p in model.parameters() if p.requires_grad]
