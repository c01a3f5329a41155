"""Nested models of the `train` request, plus the pieces infer and the query kinds share.

Field names, defaults and bounds follow ENGINE.md section 2; the aliases the reference
README promised (section 1) are folded into the canonical names before validation, so
`model_dump()` always shows canonical names. A key given under two names (or in both
`training` and `training_params`) with different values is a validation error at the
canonical field's path.
"""

from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dlwatchd.catalog.architectures import canonical_architecture_name, list_architectures
from dlwatchd.errors import DlwatchdError

# PROTOCOL.md section 3: strings are capped at 1 MiB (inline tile data is the one exception).
MAX_STRING = 1_048_576
# Normalization bounds are raw pixel units that end up in float32 arithmetic.
FLOAT32_MAX = 3.4028234663852886e38
MAX_CHANNELS = 128
# Channel indices point into the file, which may hold more channels than the model sees.
MAX_CHANNEL_INDEX = 4095

# smp 0.6 architectures the training schema has always accepted although the catalogue does not
# expose them yet (ENGINE.md section 6.1, optional extras); kept so such requests still validate.
EXTRA_ARCHITECTURE_NAMES: tuple[str, ...] = ("upernet", "segformer", "dpt")
ARCHITECTURE_NAMES: tuple[str, ...] = (*(entry.name for entry in list_architectures()), *EXTRA_ARCHITECTURE_NAMES)
ARCHITECTURE_ALIASES: Mapping[str, str] = {
    alias: entry.name for entry in list_architectures() for alias in entry.aliases
}
TRAINING_ALIASES: Mapping[str, str] = {"patience": "early_stopping_patience", "loss_function": "loss"}
NORMALIZATION_ALIASES: Mapping[str, str] = {"fixed_min": "min", "fixed_max": "max"}


def alias_schema_extra(aliases: Mapping[str, str]) -> Callable[[dict[str, Any]], None]:
    """Build a `json_schema_extra` hook that lists each alias as a property of its own.

    Aliases are folded before validation, so pydantic does not know them; without this the
    published schema (additionalProperties: false) would refuse bodies the daemon accepts.
    """

    def add_aliases(schema: dict[str, Any]) -> None:
        properties = schema.get("properties", {})
        for alias, canonical in aliases.items():
            if canonical in properties:
                properties[alias] = {**properties[canonical], "description": f"Alias of `{canonical}`."}

    return add_aliases


STRICT = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False, str_max_length=MAX_STRING)


class Conflict:
    """Marker left under a canonical key that was given twice with different values.

    The field validator of `AliasedModel` turns it into an error located at that key.
    """

    def __init__(self, key: str, first: Any, second: Any, sources: str) -> None:
        self.key, self.first, self.second, self.sources = key, first, second, sources

    def __repr__(self) -> str:
        return f"Conflict({self.key!r}, {self.first!r}, {self.second!r})"


def fold_aliases(data: Mapping[str, Any], aliases: Mapping[str, str]) -> dict[str, Any]:
    """Return a copy of `data` with alias keys renamed to their canonical names.

    Equal values under both names are fine; different values leave a `Conflict` marker.
    """
    folded = {key: value for key, value in data.items() if key not in aliases}
    for alias, canonical in aliases.items():
        if alias not in data:
            continue
        value = data[alias]
        if canonical in folded and folded[canonical] != value:
            folded[canonical] = Conflict(canonical, folded[canonical], value, f"`{canonical}` and `{alias}`")
        else:
            folded[canonical] = value
    return folded


def merge_training_blocks(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """Merge `training_params` (README name) into `training` (server name), key by key.

    Returns `data` unchanged when there is nothing to merge. Keys present in both blocks
    with different values become `Conflict` markers (an error at `training.<key>`).
    Raises PydanticCustomError when both blocks are present and one is not an object.
    """
    if "training_params" not in data:
        return data
    merged = {key: value for key, value in data.items() if key != "training_params"}
    second = data["training_params"]
    if "training" not in data:
        merged["training"] = second
        return merged
    first = data["training"]
    blocks = [
        block.model_dump(exclude_unset=True) if isinstance(block, BaseModel) else block for block in (first, second)
    ]
    if not all(isinstance(block, Mapping) for block in blocks):
        raise PydanticCustomError(
            "training_blocks", "`training` and `training_params` must both be objects to be merged"
        )
    block = fold_aliases(blocks[0], TRAINING_ALIASES)
    for key, value in fold_aliases(blocks[1], TRAINING_ALIASES).items():
        if key in block and block[key] != value:
            block[key] = Conflict(key, block[key], value, "`training` and `training_params`")
        else:
            block[key] = value
    merged["training"] = block
    return merged


def canonical_architecture(name: str) -> str:
    """Map an architecture name to its canonical lower-case form (aliases resolved).

    The catalogue resolves names; the extras are accepted on top. Raises ValueError listing the
    accepted names when the name is unknown.
    """
    key = name.strip().lower()
    if key in EXTRA_ARCHITECTURE_NAMES:
        return key
    try:
        return canonical_architecture_name(key)
    except DlwatchdError:
        names = [entry.name for entry in list_architectures()]
        aliases = [alias for entry in list_architectures() for alias in entry.aliases]
        accepted = ", ".join([*names, *EXTRA_ARCHITECTURE_NAMES, *aliases])
        raise ValueError(f"unknown architecture {name!r}; accepted names: {accepted}") from None


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _require_text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or blank")
    return value


ArchitectureName = Annotated[
    str,
    AfterValidator(canonical_architecture),
    Field(description="Architecture name in any letter case; unet++ and deeplabv3+ are aliases."),
]
# Names of encoders, catalogue entries and layers; labels of classes and channels.
Name = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_require_text)]
Label = Annotated[str, Field(min_length=1, max_length=1024), AfterValidator(_require_text)]
ChannelIndex = Annotated[int, Field(ge=0, le=MAX_CHANNEL_INDEX)]
PixelValue = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]
Bound = PixelValue | Annotated[list[PixelValue], Field(min_length=1, max_length=MAX_CHANNELS)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class AliasedModel(BaseModel):
    """Strict base for nested models: unknown keys are errors, `Conflict` markers too."""

    model_config = STRICT

    @field_validator("*", mode="before")
    @classmethod
    def _reject_conflicts(cls, value: Any) -> Any:
        if isinstance(value, Conflict):
            raise PydanticCustomError(
                "conflicting_values",
                "{sources} give different values: {first} and {second}",
                {"sources": value.sources, "first": repr(value.first), "second": repr(value.second)},
            )
        return value


def bound_lengths(bounds: Any, num_channels: int | None) -> None:
    """Check that list-valued `min`/`max` bounds of a normalization have one entry per channel.

    Raises ValueError naming the offending bound.
    """
    if num_channels is None:
        return
    for name in ("min", "max"):
        value = getattr(bounds, name)
        if isinstance(value, list) and len(value) != num_channels:
            raise ValueError(f"normalization.{name} has {len(value)} values for {num_channels} channels")


def check_bounds(lower: float | list[float], upper: float | list[float]) -> None:
    """Check `max > min`, element-wise for lists (a scalar applies to every entry of a list).

    Raises ValueError naming the first offending entry, or a length mismatch of two lists.
    """
    count = max(len(bound) if isinstance(bound, list) else 1 for bound in (lower, upper))
    lows = lower if isinstance(lower, list) else [lower] * count
    highs = upper if isinstance(upper, list) else [upper] * count
    if len(lows) != len(highs):
        raise ValueError(f"min has {len(lows)} values and max has {len(highs)}; they must match")
    for index, (low, high) in enumerate(zip(lows, highs, strict=True)):
        if not high > low:
            raise ValueError(f"max must be greater than min (entry {index}: min {low}, max {high})")


def fold_bound_aliases(data: Any) -> Any:
    """Fold `fixed_min`/`fixed_max` into `min`/`max` when `data` is a mapping; else return it."""
    return fold_aliases(data, NORMALIZATION_ALIASES) if isinstance(data, Mapping) else data


# The input schemas say what clients may send (any case, aliases); the models hold canonical values.
StrategyName = Annotated[
    Literal["percentile_99", "min_max", "z_score", "fixed_range"],
    BeforeValidator(_lower, json_schema_input_type=str),
]
STRATEGY_HELP = "percentile_99, min_max, z_score or fixed_range, in any letter case."
ClipPercentile = Annotated[float, Field(gt=50.0, le=100.0)]
Scope = Literal["tile", "dataset"]


class NormalizationConfig(AliasedModel):
    """How raw pixel values are mapped to [0, 1] in training (ENGINE.md section 4).

    `min`/`max` (also sent as `fixed_min`/`fixed_max`) stay as sent: a scalar, or a list
    with one entry per channel; `max > min` holds element-wise.
    """

    # Inherits STRICT from AliasedModel; only the schema hook is added.
    model_config = ConfigDict(json_schema_extra=alias_schema_extra(NORMALIZATION_ALIASES))

    strategy: StrategyName = Field(default="percentile_99", description=STRATEGY_HELP)
    per_channel: bool = True
    clip_percentile: ClipPercentile = 99.0
    min: Bound = 0.0
    # Validated even when absent, so that a lone `min` above 255 is caught.
    max: Bound = Field(default=255.0, validate_default=True)
    scope: Scope = "tile"

    @model_validator(mode="before")
    @classmethod
    def _fold_aliases(cls, data: Any) -> Any:
        return fold_bound_aliases(data)

    @field_validator("max")
    @classmethod
    def _max_above_min(cls, upper: float | list[float], info: ValidationInfo) -> float | list[float]:
        if "min" in info.data:  # else `min` already failed and its own error says why
            check_bounds(info.data["min"], upper)
        return upper


class ArchitectureConfig(AliasedModel):
    """The `architecture` block of a training request (ENGINE.md section 2)."""

    backbone: Name = "resnet34"
    input_size: list[Annotated[int, Field(ge=32, le=8192)]] = Field(
        default_factory=lambda: [512, 512], min_length=2, max_length=2
    )
    use_pretrained: bool = True
    frozen_layers: list[Label] | None = Field(default=None, max_length=1024)


class TrainInputConfig(AliasedModel):
    """The `input_config` block of a training request.

    `channel_names` defaults to `["Channel 0", ...]`; `selected_channels` None or [] means
    every channel of the file, otherwise it has exactly `num_channels` entries.
    """

    num_channels: int = Field(ge=1, le=MAX_CHANNELS)
    channel_names: list[Label] | None = Field(default=None, validate_default=True)
    bit_depth: Literal[8, 16, 32] = 8
    selected_channels: list[ChannelIndex] | None = Field(default=None, max_length=MAX_CHANNELS)
    normalization: NormalizationConfig = Field(default_factory=lambda: NormalizationConfig())

    @field_validator("channel_names")
    @classmethod
    def _names_per_channel(cls, names: list[str] | None, info: ValidationInfo) -> list[str] | None:
        count = info.data.get("num_channels")
        if count is None:
            return names  # num_channels failed; its own error says why
        if names is None:
            return [f"Channel {index}" for index in range(count)]
        if len(names) != count:
            raise ValueError(f"{len(names)} channel names given for num_channels = {count}")
        return names

    @field_validator("selected_channels")
    @classmethod
    def _selection_per_channel(cls, selected: list[int] | None, info: ValidationInfo) -> list[int] | None:
        count = info.data.get("num_channels")
        if selected and count is not None and len(selected) != count:
            raise ValueError(f"{len(selected)} channels selected for num_channels = {count}")
        return selected

    @field_validator("normalization")
    @classmethod
    def _bounds_per_channel(cls, normalization: NormalizationConfig, info: ValidationInfo) -> NormalizationConfig:
        bound_lengths(normalization, info.data.get("num_channels"))
        return normalization


class AugmentationConfig(AliasedModel):
    """Probabilities of the augmentation groups (ENGINE.md section 5); `image_size` is ignored."""

    p_flip: Probability = 0.5
    p_rotate: Probability = 0.5
    p_elastic: Probability = 0.3
    p_color: Probability = 0.3
    p_noise: Probability = 0.2
    # The reference accepted it; kept so its bodies validate, never used.
    image_size: int | None = Field(default=None, ge=1, le=65536)


class SchedulerConfig(AliasedModel):
    """Optional scheduler parameters (ENGINE.md section 8.3); None means the documented default."""

    T_0: int | None = Field(default=None, ge=1, le=10000)
    T_mult: int | None = Field(default=None, ge=1, le=100)
    eta_min: float | None = Field(default=None, ge=0.0, le=10.0)
    step_size: int | None = Field(default=None, ge=1, le=10000)
    gamma: float | None = Field(default=None, gt=0.0, le=1.0)
    max_lr: float | None = Field(default=None, gt=0.0, le=10.0)


def _scheduler_name(value: Any) -> Any:
    if value is None:
        return "none"
    value = _lower(value)
    return "onecycle" if value == "one_cycle" else value


SchedulerName = Annotated[
    Literal["cosine", "step", "onecycle", "none"],
    BeforeValidator(_scheduler_name, json_schema_input_type=str | None),
]
SCHEDULER_HELP = "cosine, step, onecycle (or one_cycle), or none (or null) for no scheduler."
ClassWeight = Annotated[float, Field(ge=0.0, le=1e6)]


class TrainingParams(AliasedModel):
    """The `training` block (also sent as `training_params`), defaults as ENGINE.md section 2.

    `patience` and `loss_function` are folded into `early_stopping_patience` and `loss`;
    `scheduler` is one of cosine, step, onecycle, none (JSON null and `one_cycle` mapped).
    """

    model_config = ConfigDict(json_schema_extra=alias_schema_extra(TRAINING_ALIASES))

    epochs: int = Field(default=50, ge=1, le=10000)
    batch_size: int = Field(default=8, ge=1, le=1024)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    # Recorded only: the reference client splits the data itself.
    validation_split: float = Field(default=0.2, ge=0.0, lt=1.0)
    augmentation: bool = True
    augmentation_config: AugmentationConfig = Field(default_factory=lambda: AugmentationConfig())
    scheduler: SchedulerName = Field(default="cosine", description=SCHEDULER_HELP)
    scheduler_config: SchedulerConfig = Field(default_factory=lambda: SchedulerConfig())
    early_stopping: bool = True
    early_stopping_patience: int = Field(default=10, ge=1, le=10000)
    early_stopping_min_delta: float = Field(default=0.001, ge=0.0, le=1e6)
    early_stopping_metric: Literal["val_loss", "mean_iou"] = "val_loss"
    loss: Literal["ce", "ce_dice", "focal"] = "ce"
    focal_gamma: float = Field(default=2.0, ge=0.0, le=10.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    mixed_precision: bool = False
    gradient_clip_norm: float | None = Field(default=None, gt=0.0, le=1e6)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    class_weights: list[ClassWeight] | None = Field(default=None, min_length=2, max_length=1024)
    num_workers: int = Field(default=0, ge=0, le=32)
    checkpoint_every_epochs: int = Field(default=1, ge=0, le=10000)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:[0-9]{1,3}|mps)$")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "auto: bf16 autocast where the device computes bf16 natively (CUDA AMP, CPUs with AVX512-BF16/AMX), "
            "else fp32"
        ),
    )
    export_int8: bool = Field(
        default=True,
        description="also publish model.int8.onnx, calibrated on the validation tiles, for options.precision int8",
    )

    @model_validator(mode="before")
    @classmethod
    def _fold_training_aliases(cls, data: Any) -> Any:
        return fold_aliases(data, TRAINING_ALIASES) if isinstance(data, Mapping) else data

    @field_validator("class_weights")
    @classmethod
    def _some_weight(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not any(weight > 0 for weight in weights):
            raise ValueError("class_weights must not all be zero")
        return weights


class ResumeOverrides(BaseModel):
    """jobs/<id>/resume.json: what a paused training may change when it resumes (ENGINE.md section 10.4)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int | None = Field(default=None, ge=1, le=10000)
    learning_rate: float | None = Field(default=None, gt=0.0, le=10.0, allow_inf_nan=False)
    batch_size: int | None = Field(default=None, ge=1, le=1024)
    data_path: str | None = Field(default=None, min_length=1, max_length=4096)
