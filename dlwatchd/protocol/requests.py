"""One pydantic model per request kind of the spool protocol (PROTOCOL.md section 3).

`request_adapter().validate_python(obj)` (or `.validate_json(raw)`) picks the model by
`kind` and returns a validated request; unknown keys, values out of bounds and NaN/inf are
a ValidationError whose `loc` is the path of the offending key. Dumps use the reference
field names, with aliases already resolved (`training`, `early_stopping_patience`, ...).
"""

import math
from collections import Counter
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationInfo,
    field_validator,
    model_validator,
)

from dlwatchd.protocol.infer_request import (
    MAX_TILES,
    NAME_PATTERN,
    InferInputConfig,
    InferOptions,
    Tile,
    unique_tile_ids,
)
from dlwatchd.protocol.train_request import (
    MAX_STRING,
    ArchitectureConfig,
    ArchitectureName,
    Label,
    Name,
    TrainingParams,
    TrainInputConfig,
    alias_schema_extra,
    merge_training_blocks,
)

# Free objects are echoed into status.json, so they obey the same limits as the request file.
MAX_FREE_DEPTH = 32
MAX_CLASSES = 1024


def _check_free_value(value: Any, path: str, depth: int = 0) -> None:
    if depth > MAX_FREE_DEPTH:
        raise ValueError(f"{path} is nested deeper than {MAX_FREE_DEPTH} levels")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ValueError(f"{path} holds a string longer than {MAX_STRING} characters")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} holds a non-finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_free_value(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_free_value(item, f"{path}[{index}]", depth + 1)


class RequestBase(BaseModel):
    """Fields every request shares; subclasses narrow `kind` to their own literal.

    `client` and `meta` are free JSON objects echoed in status.json (strings <= 1 MiB,
    finite numbers, depth <= 32). Any other unknown key is an error.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False, str_max_length=MAX_STRING)

    protocol: Literal[1] = 1
    kind: str
    client: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _integer_protocol(cls, value: Any) -> Any:
        # Lax mode would read `true`, `1.0` or "1" as protocol 1; a client sending those is confused.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"protocol must be the integer 1, not {value!r}")
        return value

    @field_validator("client", "meta")
    @classmethod
    def _bounded_free_object(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if value is not None:
            _check_free_value(value, str(info.field_name))
        return value


class TrainRequest(RequestBase):
    """Train a segmentation model (ENGINE.md section 2).

    The parameter block may come as `training` or `training_params` (or both: merged key
    by key, a key with two different values is an error at `training.<key>`); it is
    always stored and dumped as `training`. `model_type` is stored canonical (lower case,
    aliases resolved).
    """

    model_config = ConfigDict(json_schema_extra=alias_schema_extra({"training_params": "training"}))

    kind: Literal["train"] = "train"
    model_type: ArchitectureName
    architecture: ArchitectureConfig = Field(default_factory=lambda: ArchitectureConfig())
    input_config: TrainInputConfig
    classes: list[Label] = Field(min_length=2, max_length=MAX_CLASSES)
    training: TrainingParams = Field(default_factory=lambda: TrainingParams())
    data_path: str = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _merge_training(cls, data: Any) -> Any:
        return merge_training_blocks(data) if isinstance(data, dict) else data

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str]) -> list[str]:
        repeated = sorted(name for name, count in Counter(classes).items() if count > 1)
        if repeated:
            raise ValueError(f"class names must be unique; repeated: {', '.join(repeated)}")
        return classes

    @field_validator("training")
    @classmethod
    def _weights_per_class(cls, training: TrainingParams, info: ValidationInfo) -> TrainingParams:
        classes = info.data.get("classes")
        weights = training.class_weights
        if classes is not None and weights is not None and len(weights) != len(classes):
            raise ValueError(f"class_weights has {len(weights)} values for {len(classes)} classes")
        return training


class InferenceRequestBase(RequestBase):
    """What `infer` and `infer-pixel` share: a model, tiles, input config and options.

    Exactly one of `model_path` (a model folder, its model file, or a bare id) and
    `model_id` (resolved in the spool's models/) is given.
    """

    model_path: str | None = Field(default=None, min_length=1)
    model_id: str | None = Field(default=None, pattern=NAME_PATTERN, validate_default=True)
    tiles: list[Tile] = Field(min_length=1, max_length=MAX_TILES)
    input_config: InferInputConfig = Field(default_factory=lambda: InferInputConfig())
    options: InferOptions = Field(default_factory=lambda: InferOptions())

    def batch_key(self) -> str:
        """Requests with equal keys use the same model the same way, so their tiles can share batches."""
        options = self.options
        return f"{self.kind}|{self.model_id}|{self.model_path}|{options.use_gpu}|{options.precision}|{options.tta}"

    @field_validator("model_id")
    @classmethod
    def _one_model_reference(cls, model_id: str | None, info: ValidationInfo) -> str | None:
        # A failed model_path is absent from info.data; its own error is enough then.
        if "model_path" not in info.data:
            return model_id
        if (model_id is None) == (info.data["model_path"] is None):
            raise ValueError("give exactly one of model_path or model_id")
        return model_id

    @field_validator("tiles")
    @classmethod
    def _unique_tiles(cls, tiles: list[Tile]) -> list[Tile]:
        return unique_tile_ids(tiles)


class InferRequest(InferenceRequestBase):
    """Class-average inference: `predictions` maps each tile id to C probabilities."""

    kind: Literal["infer"] = "infer"


class InferPixelRequest(InferenceRequestBase):
    """Pixel inference: one `.bin` probability map per tile, under `output_dir` or the job's outputs/.

    `output_dir` must lie inside a configured write root (checked at intake, not here).
    """

    kind: Literal["infer-pixel"] = "infer-pixel"
    output_dir: str | None = Field(default=None, min_length=1)


class GpuClearRequest(RequestBase):
    """Cancel trainings, drop model caches and recycle workers (ENGINE.md section 13.3)."""

    kind: Literal["gpu-clear"] = "gpu-clear"


class HealthRequest(RequestBase):
    """Daemon health (PROTOCOL.md section 9)."""

    kind: Literal["health"] = "health"


class GpuRequest(RequestBase):
    """Device information (ENGINE.md section 13.2)."""

    kind: Literal["gpu"] = "gpu"


class ModelsRequest(RequestBase):
    """The models in the spool's models/ folder."""

    kind: Literal["models"] = "models"


class EncodersRequest(RequestBase):
    """The encoder catalogue."""

    kind: Literal["encoders"] = "encoders"


class ArchitecturesRequest(RequestBase):
    """The architecture catalogue."""

    kind: Literal["architectures"] = "architectures"


class EncoderInfoRequest(RequestBase):
    """One encoder's catalogue entry; an unknown name is a not-found answer, not a schema error."""

    kind: Literal["encoder-info"] = "encoder-info"
    name: Name


class ArchitectureInfoRequest(RequestBase):
    """One architecture's catalogue entry; aliases and unknown names are resolved by the catalogue."""

    kind: Literal["architecture-info"] = "architecture-info"
    name: Name


class LayersRequest(RequestBase):
    """The freezable layer groups of an architecture/encoder pair (ENGINE.md section 7.1).

    `architecture` is stored canonical, as `model_type` of a training.
    """

    kind: Literal["layers"] = "layers"
    architecture: ArchitectureName
    encoder: Name
    num_channels: int = Field(default=3, ge=1, le=128)
    num_classes: int = Field(default=2, ge=2, le=MAX_CLASSES)


class FreezeRecommendationsRequest(RequestBase):
    """Which encoder depths to freeze for a dataset size (ENGINE.md section 7.3)."""

    kind: Literal["freeze-recommendations"] = "freeze-recommendations"
    dataset_size: Literal["small", "medium", "large"]
    encoder: Name | None = None


REQUEST_MODELS: dict[str, type[RequestBase]] = {
    "train": TrainRequest,
    "infer": InferRequest,
    "infer-pixel": InferPixelRequest,
    "gpu-clear": GpuClearRequest,
    "health": HealthRequest,
    "gpu": GpuRequest,
    "models": ModelsRequest,
    "encoders": EncodersRequest,
    "architectures": ArchitecturesRequest,
    "encoder-info": EncoderInfoRequest,
    "architecture-info": ArchitectureInfoRequest,
    "layers": LayersRequest,
    "freeze-recommendations": FreezeRecommendationsRequest,
}

Request = Annotated[
    TrainRequest
    | InferRequest
    | InferPixelRequest
    | GpuClearRequest
    | HealthRequest
    | GpuRequest
    | ModelsRequest
    | EncodersRequest
    | ArchitecturesRequest
    | EncoderInfoRequest
    | ArchitectureInfoRequest
    | LayersRequest
    | FreezeRecommendationsRequest,
    Field(discriminator="kind"),
]


@cache
def request_adapter() -> TypeAdapter[Request]:
    """Return the (cached) TypeAdapter that validates any request and dispatches on `kind`.

    A missing or unknown `kind` is a ValidationError (`union_tag_not_found` /
    `union_tag_invalid`) at loc `()`.
    """
    return TypeAdapter(Request)
