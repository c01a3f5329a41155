"""Nested models of the `infer` and `infer-pixel` requests (ENGINE.md section 12.1).

Tiles carry their pixels as a path or a `data:` URL; their ids become file names, hence
the id pattern. `options.batch_size` is folded into `max_batch`.
"""

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from dlwatchd.protocol.train_request import (
    MAX_CHANNELS,
    NORMALIZATION_ALIASES,
    STRATEGY_HELP,
    AliasedModel,
    Bound,
    ChannelIndex,
    ClipPercentile,
    Scope,
    StrategyName,
    alias_schema_extra,
    bound_lengths,
    check_bounds,
    fold_aliases,
    fold_bound_aliases,
)

# Tile ids and model ids become file and directory names (PROTOCOL.md section 3).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
OPTIONS_ALIASES: Mapping[str, str] = {"batch_size": "max_batch"}
# One request file is at most 32 MiB; this caps the tile list well above any real use.
MAX_TILES = 100_000
COORDINATE = 2**31 - 1


class Tile(BaseModel):
    """One tile to classify: `data` is a file path or a `data:` URL; `x`, `y` are recorded only.

    `data` has no string limit here: inline tiles are bounded by the request file size.
    """

    # Not AliasedModel: its 1 MiB string cap must not apply to inline tile data.
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    id: str = Field(pattern=NAME_PATTERN)
    data: str = Field(min_length=1)
    x: int | None = Field(default=None, ge=-COORDINATE, le=COORDINATE)
    y: int | None = Field(default=None, ge=-COORDINATE, le=COORDINATE)


class InferNormalization(AliasedModel):
    """Normalization fields an inference request sends; None means "not sent".

    The model's stored normalization wins field by field unless
    `options.normalization_override`; sent fields fill what it lacks, then the training
    defaults apply (ENGINE.md section 12.3). Keeping "not sent" as None, not as a default,
    lets that resolution survive a dump and reload of request.json.
    """

    model_config = ConfigDict(json_schema_extra=alias_schema_extra(NORMALIZATION_ALIASES))

    strategy: StrategyName | None = Field(default=None, description=STRATEGY_HELP)
    per_channel: bool | None = None
    clip_percentile: ClipPercentile | None = None
    min: Bound | None = None
    max: Bound | None = None
    scope: Scope | None = None

    @model_validator(mode="before")
    @classmethod
    def _fold_aliases(cls, data: Any) -> Any:
        return fold_bound_aliases(data)

    @field_validator("max")
    @classmethod
    def _max_above_min(cls, upper: float | list[float] | None, info: ValidationInfo) -> float | list[float] | None:
        # Only a pair sent together can be checked; a lone bound meets the model's at run time.
        lower = info.data.get("min")
        if lower is not None and upper is not None:
            check_bounds(lower, upper)
        return upper


class InferInputConfig(AliasedModel):
    """The optional `input_config` of an inference request; every field is checked against the model.

    `selected_channels` None or [] means all channels.
    """

    num_channels: int | None = Field(default=None, ge=1, le=MAX_CHANNELS)
    selected_channels: list[ChannelIndex] | None = Field(default=None, max_length=MAX_CHANNELS)
    normalization: InferNormalization | None = None

    @field_validator("selected_channels")
    @classmethod
    def _selection_per_channel(cls, selected: list[int] | None, info: ValidationInfo) -> list[int] | None:
        count = info.data.get("num_channels")
        if selected and count is not None and len(selected) != count:
            raise ValueError(f"{len(selected)} channels selected for num_channels = {count}")
        return selected

    @field_validator("normalization")
    @classmethod
    def _bounds_per_channel(
        cls, normalization: InferNormalization | None, info: ValidationInfo
    ) -> InferNormalization | None:
        if normalization is not None:
            bound_lengths(normalization, info.data.get("num_channels"))
        return normalization


class InferOptions(AliasedModel):
    """The `options` of an inference request (ENGINE.md sections 12.1, 12.8).

    `blend_mode` is recorded only (blending happens in the client); `sha256` switches the
    manifest checksums (off for interactive use).
    """

    model_config = ConfigDict(json_schema_extra=alias_schema_extra(OPTIONS_ALIASES))

    use_gpu: bool = True
    blend_mode: str = Field(default="linear", min_length=1, max_length=64)
    tta: Literal["none", "flip", "d4"] = "none"
    normalization_override: bool = False
    max_batch: int = Field(default=16, ge=1, le=256)
    precision: Literal["fp32", "bf16", "int8"] = "fp32"
    sha256: bool = True

    @model_validator(mode="before")
    @classmethod
    def _fold_batch_alias(cls, data: Any) -> Any:
        return fold_aliases(data, OPTIONS_ALIASES) if isinstance(data, Mapping) else data


def unique_tile_ids(tiles: list[Tile]) -> list[Tile]:
    """Return `tiles` unchanged; raise ValueError naming the ids that occur more than once."""
    seen: set[str] = set()
    repeated: list[str] = []
    for tile in tiles:
        if tile.id in seen and tile.id not in repeated:
            repeated.append(tile.id)
        seen.add(tile.id)
    if repeated:
        raise ValueError(f"tile ids must be unique within a request; repeated: {', '.join(repeated[:10])}")
    return tiles
