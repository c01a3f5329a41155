"""Request models: aliases, defaults, bounds, unknown keys and dispatch on `kind`."""

import copy
import json
import typing
from typing import Any

import pytest
from pydantic import ValidationError

from dlwatchd.protocol.requests import (
    REQUEST_MODELS,
    ArchitectureInfoRequest,
    EncoderInfoRequest,
    FreezeRecommendationsRequest,
    InferPixelRequest,
    InferRequest,
    LayersRequest,
    RequestBase,
    TrainRequest,
    request_adapter,
)

REFERENCE_BODY: dict[str, Any] = {
    "kind": "train",
    "model_type": "UNet",
    "architecture": {
        "backbone": "resnet34",
        "input_size": [512, 512],
        "use_pretrained": True,
        "frozen_layers": ["encoder.conv1", "encoder.layer1"],
    },
    "input_config": {
        "num_channels": 3,
        "channel_names": ["Red", "Green", "Blue"],
        "bit_depth": 8,
        "normalization": {"strategy": "PERCENTILE_99", "per_channel": True, "clip_percentile": 99.0},
    },
    "training": {
        "epochs": 50,
        "batch_size": 8,
        "learning_rate": 0.001,
        "weight_decay": 0.0001,
        "validation_split": 0.2,
        "augmentation": True,
    },
    "classes": ["Tumor", "Stroma", "Background"],
    "data_path": "/tmp/x",
}

MINIMAL_TRAIN: dict[str, Any] = {
    "kind": "train",
    "model_type": "unet",
    "input_config": {"num_channels": 3},
    "classes": ["a", "b"],
    "data_path": "/data",
}

MINIMAL_INFER: dict[str, Any] = {
    "kind": "infer",
    "model_id": "unet_20240101_120000",
    "tiles": [{"id": "t1", "data": "/x.tif"}],
}

MINIMAL_BODIES: dict[str, dict[str, Any]] = {
    "train": MINIMAL_TRAIN,
    "infer": MINIMAL_INFER,
    "infer-pixel": {**MINIMAL_INFER, "kind": "infer-pixel"},
    "gpu-clear": {"kind": "gpu-clear"},
    "health": {"kind": "health"},
    "gpu": {"kind": "gpu"},
    "models": {"kind": "models"},
    "encoders": {"kind": "encoders"},
    "architectures": {"kind": "architectures"},
    "encoder-info": {"kind": "encoder-info", "name": "resnet34"},
    "architecture-info": {"kind": "architecture-info", "name": "unet++"},
    "layers": {"kind": "layers", "architecture": "unet", "encoder": "resnet18"},
    "freeze-recommendations": {"kind": "freeze-recommendations", "dataset_size": "small"},
}


def validate(body: dict[str, Any]) -> Any:
    return request_adapter().validate_python(body)


def with_value(body: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `body` with `value` set at `path`, creating objects on the way."""
    out = copy.deepcopy(body)
    node = out
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return out


def error_locs(body: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The locs of the errors of `body`, without the union's leading kind tag."""
    with pytest.raises(ValidationError) as caught:
        validate(body)
    return [tuple(error["loc"][1:]) for error in caught.value.errors()]


def single_error(body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as caught:
        validate(body)
    errors = caught.value.errors()
    assert len(errors) == 1, errors
    return dict(errors[0], loc=tuple(errors[0]["loc"][1:]))


# --- the reference body and dispatch -------------------------------------------------------------


def test_reference_client_body_is_accepted_and_canonicalised() -> None:
    request = validate(REFERENCE_BODY)
    assert isinstance(request, TrainRequest)
    dumped = request.model_dump()
    assert dumped["model_type"] == "unet"
    assert dumped["input_config"]["normalization"]["strategy"] == "percentile_99"
    assert dumped["input_config"]["channel_names"] == ["Red", "Green", "Blue"]
    assert dumped["architecture"]["frozen_layers"] == ["encoder.conv1", "encoder.layer1"]
    assert dumped["training"]["validation_split"] == 0.2
    assert dumped["classes"] == ["Tumor", "Stroma", "Background"]
    assert "training_params" not in dumped


def test_reference_body_validates_without_kind_through_its_model() -> None:
    body = {key: value for key, value in REFERENCE_BODY.items() if key != "kind"}
    assert TrainRequest.model_validate(body).kind == "train"


@pytest.mark.parametrize("kind", sorted(MINIMAL_BODIES))
def test_union_dispatches_on_kind(kind: str) -> None:
    request = validate(MINIMAL_BODIES[kind])
    assert type(request) is REQUEST_MODELS[kind]
    assert request.kind == kind
    assert request.protocol == 1


@pytest.mark.parametrize("kind", sorted(MINIMAL_BODIES))
def test_dump_validates_again_to_an_equal_request(kind: str) -> None:
    # request.json holds the accepted request with defaults filled; a worker reads it back.
    request = validate(MINIMAL_BODIES[kind])
    again = validate(json.loads(json.dumps(request.model_dump(mode="json"))))
    assert again == request


def test_registry_covers_the_thirteen_kinds_with_matching_literals() -> None:
    assert set(REQUEST_MODELS) == set(MINIMAL_BODIES)
    for kind, model in REQUEST_MODELS.items():
        assert issubclass(model, RequestBase)
        assert typing.get_args(model.model_fields["kind"].annotation) == (kind,)


def test_adapter_is_cached() -> None:
    assert request_adapter() is request_adapter()


def test_unknown_and_missing_kind_are_errors() -> None:
    with pytest.raises(ValidationError) as caught:
        validate({"kind": "retrain"})
    assert caught.value.errors()[0]["type"] == "union_tag_invalid"
    with pytest.raises(ValidationError) as caught:
        validate({"model_type": "unet"})
    assert caught.value.errors()[0]["type"] == "union_tag_not_found"


@pytest.mark.parametrize("protocol", [2, 0, True, 1.0, "1", None])
def test_protocol_other_than_the_integer_one_is_an_error_at_protocol(protocol: Any) -> None:
    assert single_error({"kind": "health", "protocol": protocol})["loc"] == ("protocol",)


def test_protocol_defaults_to_one() -> None:
    assert validate({"kind": "health"}).protocol == 1
    assert validate({"kind": "health", "protocol": 1}).protocol == 1


def test_client_and_meta_are_free_objects() -> None:
    request = validate({"kind": "health", "client": {"name": "qupath", "version": "0.6"}, "meta": {"a": [1, {"b": 2}]}})
    assert request.client == {"name": "qupath", "version": "0.6"}
    assert request.meta == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize(
    "meta",
    [{"x": float("nan")}, {"x": [float("inf")]}, {"x": "s" * 1_048_577}],
)
def test_free_objects_keep_the_request_limits(meta: dict[str, Any]) -> None:
    assert single_error({"kind": "health", "meta": meta})["loc"] == ("meta",)


def test_strings_are_capped_at_one_mebibyte() -> None:
    error = single_error(with_value(MINIMAL_TRAIN, ("data_path",), "p" * 1_048_577))
    assert error["loc"] == ("data_path",)
    assert error["type"] == "string_too_long"


def test_json_schema_lists_the_aliases() -> None:
    schema = request_adapter().json_schema()
    definitions = schema["$defs"]
    assert "training_params" in definitions["TrainRequest"]["properties"]
    assert {"patience", "loss_function"} <= set(definitions["TrainingParams"]["properties"])
    assert {"fixed_min", "fixed_max"} <= set(definitions["NormalizationConfig"]["properties"])
    assert "batch_size" in definitions["InferOptions"]["properties"]


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ("epoch",),
        ("architecture", "encoder"),
        ("input_config", "channels"),
        ("input_config", "normalization", "percentile"),
        ("training", "epoch"),
        ("training", "augmentation_config", "p_blur"),
        ("training", "scheduler_config", "t0"),
    ],
)
def test_unknown_train_key_is_an_error_at_its_path(path: tuple[str, ...]) -> None:
    error = single_error(with_value(MINIMAL_TRAIN, path, 1))
    assert error["loc"] == path
    assert error["type"] == "extra_forbidden"


def test_unknown_key_under_training_params_is_reported_under_training() -> None:
    error = single_error(with_value(MINIMAL_TRAIN, ("training_params", "epoch"), 3))
    assert error["loc"] == ("training", "epoch")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        (with_value(MINIMAL_INFER, ("options", "blend"), 1), ("options", "blend")),
        (with_value(MINIMAL_INFER, ("input_config", "channels"), 1), ("input_config", "channels")),
        (with_value(MINIMAL_INFER, ("output_dir",), "/out"), ("output_dir",)),
        ({**MINIMAL_INFER, "tiles": [{"id": "a", "data": "/a", "z": 0}]}, ("tiles", 0, "z")),
        ({"kind": "gpu", "device": 0}, ("device",)),
        ({"kind": "layers", "architecture": "unet", "encoder": "resnet18", "depth": 3}, ("depth",)),
    ],
)
def test_unknown_key_of_other_kinds_is_an_error_at_its_path(body: dict[str, Any], path: tuple[Any, ...]) -> None:
    error = single_error(body)
    assert error["loc"] == path
    assert error["type"] == "extra_forbidden"


# --- training defaults ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (("architecture", "backbone"), "resnet34"),
        (("architecture", "input_size"), [512, 512]),
        (("architecture", "use_pretrained"), True),
        (("architecture", "frozen_layers"), None),
        (("input_config", "channel_names"), ["Channel 0", "Channel 1", "Channel 2"]),
        (("input_config", "bit_depth"), 8),
        (("input_config", "selected_channels"), None),
        (("input_config", "normalization", "strategy"), "percentile_99"),
        (("input_config", "normalization", "per_channel"), True),
        (("input_config", "normalization", "clip_percentile"), 99.0),
        (("input_config", "normalization", "min"), 0.0),
        (("input_config", "normalization", "max"), 255.0),
        (("input_config", "normalization", "scope"), "tile"),
        (("training", "epochs"), 50),
        (("training", "batch_size"), 8),
        (("training", "learning_rate"), 1e-3),
        (("training", "weight_decay"), 1e-4),
        (("training", "validation_split"), 0.2),
        (("training", "augmentation"), True),
        (("training", "augmentation_config", "p_flip"), 0.5),
        (("training", "augmentation_config", "p_rotate"), 0.5),
        (("training", "augmentation_config", "p_elastic"), 0.3),
        (("training", "augmentation_config", "p_color"), 0.3),
        (("training", "augmentation_config", "p_noise"), 0.2),
        (("training", "scheduler"), "cosine"),
        (("training", "scheduler_config", "T_0"), None),
        (("training", "early_stopping"), True),
        (("training", "early_stopping_patience"), 10),
        (("training", "early_stopping_min_delta"), 0.001),
        (("training", "early_stopping_metric"), "val_loss"),
        (("training", "loss"), "ce"),
        (("training", "focal_gamma"), 2.0),
        (("training", "optimizer"), "adam"),
        (("training", "mixed_precision"), False),
        (("training", "gradient_clip_norm"), None),
        (("training", "seed"), None),
        (("training", "class_weights"), None),
        (("training", "num_workers"), 0),
        (("training", "checkpoint_every_epochs"), 1),
        (("training", "device"), "auto"),
    ],
)
def test_training_default(path: tuple[str, ...], expected: Any) -> None:
    node: Any = validate(MINIMAL_TRAIN).model_dump()
    for key in path:
        node = node[key]
    assert node == expected


# --- training aliases and merging -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("UNet", "unet"),
        ("unet++", "unetplusplus"),
        ("UNet++", "unetplusplus"),
        ("UnetPlusPlus", "unetplusplus"),
        ("deeplabv3+", "deeplabv3plus"),
        ("DeepLabV3Plus", "deeplabv3plus"),
        ("DeepLabV3", "deeplabv3"),
        ("FPN", "fpn"),
        ("PSPNet", "pspnet"),
        ("MAnet", "manet"),
        ("Linknet", "linknet"),
        ("PAN", "pan"),
        ("UPerNet", "upernet"),
        ("Segformer", "segformer"),
        ("DPT", "dpt"),
    ],
)
def test_model_type_is_case_insensitive_with_aliases(sent: str, canonical: str) -> None:
    assert validate(with_value(MINIMAL_TRAIN, ("model_type",), sent)).model_type == canonical


@pytest.mark.parametrize("sent", ["segnet", "custom_onnx", "unet+", ""])
def test_unknown_model_type_lists_the_accepted_names(sent: str) -> None:
    error = single_error(with_value(MINIMAL_TRAIN, ("model_type",), sent))
    assert error["loc"] == ("model_type",)
    assert "unetplusplus" in error["msg"] and "deeplabv3+" in error["msg"]


def test_model_type_is_required() -> None:
    body = {key: value for key, value in MINIMAL_TRAIN.items() if key != "model_type"}
    assert single_error(body)["loc"] == ("model_type",)


def test_training_params_alone_is_stored_as_training() -> None:
    body = {**MINIMAL_TRAIN, "training_params": {"epochs": 7, "early_stopping": False}}
    request = validate(body)
    assert request.training.epochs == 7
    assert request.training.early_stopping is False
    assert request.model_dump()["training"]["epochs"] == 7


def test_training_and_training_params_are_merged_key_by_key() -> None:
    body = {
        **MINIMAL_TRAIN,
        "training": {"epochs": 7, "batch_size": 4},
        "training_params": {"epochs": 7, "scheduler": "step"},
    }
    training = validate(body).training
    assert (training.epochs, training.batch_size, training.scheduler) == (7, 4, "step")


def test_same_key_with_two_values_in_training_and_training_params_is_an_error() -> None:
    body = {**MINIMAL_TRAIN, "training": {"epochs": 7}, "training_params": {"epochs": 8}}
    error = single_error(body)
    assert error["loc"] == ("training", "epochs")
    assert error["type"] == "conflicting_values"
    assert "training_params" in error["msg"]


def test_merge_sees_aliases_in_either_block() -> None:
    same = {**MINIMAL_TRAIN, "training": {"patience": 4}, "training_params": {"early_stopping_patience": 4}}
    assert validate(same).training.early_stopping_patience == 4
    different = {
        **MINIMAL_TRAIN,
        "training": {"patience": 4},
        "training_params": {"early_stopping_patience": 5},
    }
    assert single_error(different)["loc"] == ("training", "early_stopping_patience")


def test_training_blocks_must_both_be_objects_to_merge() -> None:
    body = {**MINIMAL_TRAIN, "training": {"epochs": 7}, "training_params": [1]}
    with pytest.raises(ValidationError):
        validate(body)


@pytest.mark.parametrize(
    ("alias", "field", "value"),
    [("patience", "early_stopping_patience", 3), ("loss_function", "loss", "focal")],
)
def test_training_key_aliases(alias: str, field: str, value: Any) -> None:
    request = validate(with_value(MINIMAL_TRAIN, ("training", alias), value))
    assert getattr(request.training, field) == value
    dumped = request.model_dump()["training"]
    assert alias not in dumped and dumped[field] == value


def test_alias_and_canonical_key_with_different_values_is_an_error() -> None:
    body = with_value(MINIMAL_TRAIN, ("training",), {"loss": "ce", "loss_function": "focal"})
    error = single_error(body)
    assert error["loc"] == ("training", "loss")
    assert error["type"] == "conflicting_values"


def test_alias_and_canonical_key_with_equal_values_are_accepted() -> None:
    body = with_value(MINIMAL_TRAIN, ("training",), {"patience": 6, "early_stopping_patience": 6})
    assert validate(body).training.early_stopping_patience == 6


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("onecycle", "onecycle"),
        ("one_cycle", "onecycle"),
        ("OneCycle", "onecycle"),
        ("none", "none"),
        (None, "none"),
        ("step", "step"),
        ("Cosine", "cosine"),
    ],
)
def test_scheduler_names(sent: Any, canonical: str) -> None:
    assert validate(with_value(MINIMAL_TRAIN, ("training", "scheduler"), sent)).training.scheduler == canonical


def test_unknown_scheduler_is_an_error() -> None:
    error = single_error(with_value(MINIMAL_TRAIN, ("training", "scheduler"), "plateau"))
    assert error["loc"] == ("training", "scheduler")


@pytest.mark.parametrize(
    ("sent", "canonical"),
    [
        ("PERCENTILE_99", "percentile_99"),
        ("Min_Max", "min_max"),
        ("z_score", "z_score"),
        ("FIXED_RANGE", "fixed_range"),
    ],
)
def test_normalization_strategy_is_case_insensitive(sent: str, canonical: str) -> None:
    body = with_value(MINIMAL_TRAIN, ("input_config", "normalization", "strategy"), sent)
    assert validate(body).input_config.normalization.strategy == canonical


def test_unknown_normalization_strategy_is_an_error() -> None:
    body = with_value(MINIMAL_TRAIN, ("input_config", "normalization", "strategy"), "imagenet")
    assert single_error(body)["loc"] == ("input_config", "normalization", "strategy")


# --- fixed_range bounds ---------------------------------------------------------------------------


def normalization_body(normalization: dict[str, Any], num_channels: int = 3) -> dict[str, Any]:
    return with_value(MINIMAL_TRAIN, ("input_config",), {"num_channels": num_channels, "normalization": normalization})


@pytest.mark.parametrize(
    ("sent", "lower", "upper"),
    [
        ({"min": 10, "max": 4000}, 10.0, 4000.0),
        ({"fixed_min": 10, "fixed_max": 4000}, 10.0, 4000.0),
        ({"fixed_min": [0, 1, 2], "max": [10, 11, 12]}, [0.0, 1.0, 2.0], [10.0, 11.0, 12.0]),
        ({"min": 0, "max": [10, 11, 12]}, 0.0, [10.0, 11.0, 12.0]),
        ({"min": 5, "fixed_min": 5}, 5.0, 255.0),
    ],
)
def test_fixed_range_bounds_are_stored_as_sent(sent: dict[str, Any], lower: Any, upper: Any) -> None:
    normalization = validate(normalization_body({"strategy": "fixed_range", **sent})).input_config.normalization
    dumped = normalization.model_dump()
    assert (dumped["min"], dumped["max"]) == (lower, upper)
    assert "fixed_min" not in dumped and "fixed_max" not in dumped


@pytest.mark.parametrize(
    "sent",
    [
        {"min": 10, "max": 10},
        {"min": 10, "max": 5},
        {"min": [0, 0, 0], "max": [10, 0, 10]},
        {"min": [0, 20, 0], "max": 10},
        {"min": [0, 0], "max": [1, 1, 1]},
        {"fixed_min": 300},
    ],
)
def test_fixed_range_max_must_exceed_min(sent: dict[str, Any]) -> None:
    error = single_error(normalization_body({"strategy": "fixed_range", **sent}))
    assert error["loc"][:3] == ("input_config", "normalization", "max")


def test_fixed_range_list_must_have_one_bound_per_channel() -> None:
    error = single_error(normalization_body({"min": [0, 0], "max": [9, 9]}))
    assert error["loc"] == ("input_config", "normalization")
    assert "3 channels" in error["msg"]


def test_min_and_fixed_min_with_different_values_is_an_error() -> None:
    error = single_error(normalization_body({"min": 1, "fixed_min": 2}))
    assert error["loc"] == ("input_config", "normalization", "min")
    assert error["type"] == "conflicting_values"


# --- input_config and classes ---------------------------------------------------------------------


def test_channel_names_must_match_num_channels() -> None:
    body = with_value(MINIMAL_TRAIN, ("input_config", "channel_names"), ["R", "G"])
    assert single_error(body)["loc"] == ("input_config", "channel_names")


def test_channel_names_default_follows_num_channels() -> None:
    body = with_value(MINIMAL_TRAIN, ("input_config", "num_channels"), 2)
    assert validate(body).input_config.channel_names == ["Channel 0", "Channel 1"]


def test_num_channels_is_required() -> None:
    body = with_value(MINIMAL_TRAIN, ("input_config",), {})
    assert error_locs(body) == [("input_config", "num_channels")]


def test_selected_channels_must_give_num_channels_channels() -> None:
    good = with_value(MINIMAL_TRAIN, ("input_config", "selected_channels"), [4, 2, 2])
    assert validate(good).input_config.selected_channels == [4, 2, 2]
    bad = with_value(MINIMAL_TRAIN, ("input_config", "selected_channels"), [0, 1])
    assert single_error(bad)["loc"] == ("input_config", "selected_channels")


@pytest.mark.parametrize(
    ("classes", "loc"),
    [
        (["only"], ("classes",)),
        ([], ("classes",)),
        (["a", "b", "a"], ("classes",)),
        (["a", ""], ("classes", 1)),
        (["a", "   "], ("classes", 1)),
        (["a", 3], ("classes", 1)),
    ],
)
def test_classes_are_at_least_two_unique_non_empty_names(classes: list[Any], loc: tuple[Any, ...]) -> None:
    assert single_error(with_value(MINIMAL_TRAIN, ("classes",), classes))["loc"] == loc


def test_class_weights_need_one_positive_weight_per_class() -> None:
    good = with_value(MINIMAL_TRAIN, ("training", "class_weights"), [1.0, 0.0])
    assert validate(good).training.class_weights == [1.0, 0.0]
    assert single_error(with_value(MINIMAL_TRAIN, ("training", "class_weights"), [1, 2, 3]))["loc"] == ("training",)
    zero = single_error(with_value(MINIMAL_TRAIN, ("training", "class_weights"), [0, 0]))
    assert zero["loc"] == ("training", "class_weights")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_device_accepts_the_documented_forms(device: str) -> None:
    assert validate(with_value(MINIMAL_TRAIN, ("training", "device"), device)).training.device == device


# --- bounds ---------------------------------------------------------------------------------------

TRAIN_BOUNDS: list[tuple[tuple[str, ...], Any, tuple[Any, ...]]] = [
    (("architecture", "input_size"), [31, 512], ("architecture", "input_size", 0)),
    (("architecture", "input_size"), [512, 8193], ("architecture", "input_size", 1)),
    (("architecture", "input_size"), [512], ("architecture", "input_size")),
    (("architecture", "backbone"), "", ("architecture", "backbone")),
    (("input_config", "num_channels"), 0, ("input_config", "num_channels")),
    (("input_config", "num_channels"), 129, ("input_config", "num_channels")),
    (("input_config", "bit_depth"), 12, ("input_config", "bit_depth")),
    (("input_config", "selected_channels"), [0, -1, 2], ("input_config", "selected_channels", 1)),
    (
        ("input_config", "normalization", "clip_percentile"),
        50,
        ("input_config", "normalization", "clip_percentile"),
    ),
    (
        ("input_config", "normalization", "clip_percentile"),
        100.5,
        ("input_config", "normalization", "clip_percentile"),
    ),
    (("input_config", "normalization", "scope"), "image", ("input_config", "normalization", "scope")),
    (("training", "epochs"), 0, ("training", "epochs")),
    (("training", "epochs"), 10001, ("training", "epochs")),
    (("training", "epochs"), 2.5, ("training", "epochs")),
    (("training", "batch_size"), 0, ("training", "batch_size")),
    (("training", "batch_size"), 1025, ("training", "batch_size")),
    (("training", "learning_rate"), 0, ("training", "learning_rate")),
    (("training", "learning_rate"), 10.5, ("training", "learning_rate")),
    (("training", "learning_rate"), float("nan"), ("training", "learning_rate")),
    (("training", "weight_decay"), -0.1, ("training", "weight_decay")),
    (("training", "weight_decay"), float("inf"), ("training", "weight_decay")),
    (("training", "validation_split"), 1.0, ("training", "validation_split")),
    (("training", "augmentation_config", "p_flip"), 1.5, ("training", "augmentation_config", "p_flip")),
    (("training", "augmentation_config", "p_rotate"), -0.1, ("training", "augmentation_config", "p_rotate")),
    (("training", "augmentation_config", "p_elastic"), 2, ("training", "augmentation_config", "p_elastic")),
    (("training", "augmentation_config", "p_color"), -1, ("training", "augmentation_config", "p_color")),
    (("training", "augmentation_config", "p_noise"), 1.01, ("training", "augmentation_config", "p_noise")),
    (("training", "scheduler_config", "T_0"), 0, ("training", "scheduler_config", "T_0")),
    (("training", "scheduler_config", "T_mult"), 0, ("training", "scheduler_config", "T_mult")),
    (("training", "scheduler_config", "eta_min"), -1e-6, ("training", "scheduler_config", "eta_min")),
    (("training", "scheduler_config", "step_size"), 0, ("training", "scheduler_config", "step_size")),
    (("training", "scheduler_config", "gamma"), 0, ("training", "scheduler_config", "gamma")),
    (("training", "scheduler_config", "gamma"), 1.1, ("training", "scheduler_config", "gamma")),
    (("training", "scheduler_config", "max_lr"), 0, ("training", "scheduler_config", "max_lr")),
    (("training", "scheduler_config", "max_lr"), 11, ("training", "scheduler_config", "max_lr")),
    (("training", "early_stopping_patience"), 0, ("training", "early_stopping_patience")),
    (("training", "patience"), 10001, ("training", "early_stopping_patience")),
    (("training", "early_stopping_min_delta"), -0.001, ("training", "early_stopping_min_delta")),
    (("training", "early_stopping_metric"), "accuracy", ("training", "early_stopping_metric")),
    (("training", "loss"), "dice", ("training", "loss")),
    (("training", "loss_function"), "lovasz", ("training", "loss")),
    (("training", "focal_gamma"), 10.5, ("training", "focal_gamma")),
    (("training", "optimizer"), "sgd", ("training", "optimizer")),
    (("training", "gradient_clip_norm"), 0, ("training", "gradient_clip_norm")),
    (("training", "seed"), -1, ("training", "seed")),
    (("training", "seed"), 2**32, ("training", "seed")),
    (("training", "class_weights"), [1.0, -1.0], ("training", "class_weights", 1)),
    (("training", "num_workers"), 33, ("training", "num_workers")),
    (("training", "checkpoint_every_epochs"), -1, ("training", "checkpoint_every_epochs")),
    (("training", "device"), "gpu", ("training", "device")),
    (("training", "device"), "cuda:x", ("training", "device")),
    (("data_path",), "", ("data_path",)),
]


@pytest.mark.parametrize(
    ("path", "value", "loc"), TRAIN_BOUNDS, ids=[f"{'.'.join(p)}={v!r}" for p, v, _ in TRAIN_BOUNDS]
)
def test_train_value_out_of_bounds_is_an_error_at_its_path(
    path: tuple[str, ...], value: Any, loc: tuple[Any, ...]
) -> None:
    assert error_locs(with_value(MINIMAL_TRAIN, path, value)) == [loc]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("training", "epochs"), 1),
        (("training", "epochs"), 10000),
        (("training", "learning_rate"), 10),
        (("training", "weight_decay"), 1),
        (("training", "validation_split"), 0),
        (("training", "scheduler_config", "gamma"), 1),
        (("training", "seed"), 2**32 - 1),
        (("training", "checkpoint_every_epochs"), 0),
        (("input_config", "normalization", "clip_percentile"), 100),
        (("input_config", "num_channels"), 128),
        (("architecture", "input_size"), [32, 8192]),
    ],
)
def test_train_value_on_the_bound_is_accepted(path: tuple[str, ...], value: Any) -> None:
    validate(with_value(MINIMAL_TRAIN, path, value))


# --- inference ------------------------------------------------------------------------------------


def test_infer_defaults() -> None:
    request = validate(MINIMAL_INFER)
    assert isinstance(request, InferRequest)
    assert request.model_path is None
    assert request.options.model_dump() == {
        "use_gpu": True,
        "blend_mode": "linear",
        "tta": "none",
        "normalization_override": False,
        "max_batch": 16,
        "precision": "fp32",
        "sha256": True,
    }
    assert request.input_config.model_dump() == {
        "num_channels": None,
        "selected_channels": None,
        "normalization": None,
    }
    assert request.tiles[0].x is None and request.tiles[0].y is None


def test_infer_pixel_takes_an_output_dir() -> None:
    request = validate({**MINIMAL_INFER, "kind": "infer-pixel", "output_dir": "/out"})
    assert isinstance(request, InferPixelRequest)
    assert request.output_dir == "/out"
    assert not isinstance(request, InferRequest)


@pytest.mark.parametrize(
    "references",
    [{}, {"model_id": "m1", "model_path": "/models/m1"}, {"model_id": None, "model_path": None}],
)
def test_exactly_one_model_reference(references: dict[str, Any]) -> None:
    body = {"kind": "infer", "tiles": [{"id": "a", "data": "/a"}], **references}
    assert single_error(body)["loc"] == ("model_id",)


def test_model_path_alone_is_accepted() -> None:
    request = validate(
        {"kind": "infer", "model_path": "/models/unet_1/model.onnx", "tiles": [{"id": "a", "data": "/a"}]}
    )
    assert request.model_path == "/models/unet_1/model.onnx" and request.model_id is None


@pytest.mark.parametrize("model_id", ["../escape", ".hidden", "a/b", "x" * 129, ""])
def test_model_id_must_be_a_safe_name(model_id: str) -> None:
    assert single_error({**MINIMAL_INFER, "model_id": model_id})["loc"] == ("model_id",)


@pytest.mark.parametrize("tile_id", ["../x", ".x", "a b", "a/b", "x" * 129, "", "é"])
def test_tile_id_must_be_a_safe_file_name(tile_id: str) -> None:
    body = {**MINIMAL_INFER, "tiles": [{"id": tile_id, "data": "/a"}]}
    assert single_error(body)["loc"] == ("tiles", 0, "id")


@pytest.mark.parametrize("tile_id", ["a", "Tile_1.0-2", "0", "x" * 128])
def test_tile_id_accepts_safe_names(tile_id: str) -> None:
    validate({**MINIMAL_INFER, "tiles": [{"id": tile_id, "data": "/a"}]})


def test_tile_ids_are_unique_within_a_request() -> None:
    body = {
        **MINIMAL_INFER,
        "tiles": [{"id": "a", "data": "/a"}, {"id": "b", "data": "/b"}, {"id": "a", "data": "/c"}],
    }
    error = single_error(body)
    assert error["loc"] == ("tiles",)
    assert "a" in error["msg"]


def test_tiles_must_not_be_empty() -> None:
    assert single_error({**MINIMAL_INFER, "tiles": []})["loc"] == ("tiles",)


def test_tile_data_is_exempt_from_the_string_limit() -> None:
    data = "data:image/png;base64," + "A" * 2_000_000
    request = validate({**MINIMAL_INFER, "tiles": [{"id": "a", "data": data, "x": 10, "y": 20}]})
    assert len(request.tiles[0].data) == len(data)
    assert (request.tiles[0].x, request.tiles[0].y) == (10, 20)


def test_tile_data_must_not_be_empty() -> None:
    assert single_error({**MINIMAL_INFER, "tiles": [{"id": "a", "data": ""}]})["loc"] == ("tiles", 0, "data")


def test_options_batch_size_is_an_alias_of_max_batch() -> None:
    assert validate(with_value(MINIMAL_INFER, ("options", "batch_size"), 4)).options.max_batch == 4
    conflict = with_value(MINIMAL_INFER, ("options",), {"batch_size": 4, "max_batch": 8})
    assert single_error(conflict)["loc"] == ("options", "max_batch")


@pytest.mark.parametrize(
    ("path", "value", "loc"),
    [
        (("options", "max_batch"), 0, ("options", "max_batch")),
        (("options", "max_batch"), 257, ("options", "max_batch")),
        (("options", "batch_size"), 257, ("options", "max_batch")),
        (("options", "tta"), "d8", ("options", "tta")),
        (("options", "precision"), "fp16", ("options", "precision")),
        (("options", "use_gpu"), "maybe", ("options", "use_gpu")),
        (("options", "blend_mode"), "", ("options", "blend_mode")),
        (("input_config", "num_channels"), 0, ("input_config", "num_channels")),
        (("input_config", "selected_channels"), [-1], ("input_config", "selected_channels", 0)),
        (
            ("input_config", "normalization", "clip_percentile"),
            20,
            ("input_config", "normalization", "clip_percentile"),
        ),
        (
            ("input_config", "normalization", "strategy"),
            "mean",
            ("input_config", "normalization", "strategy"),
        ),
    ],
)
def test_infer_value_out_of_bounds_is_an_error_at_its_path(
    path: tuple[str, ...], value: Any, loc: tuple[Any, ...]
) -> None:
    assert error_locs(with_value(MINIMAL_INFER, path, value)) == [loc]


@pytest.mark.parametrize(("tta", "precision"), [("flip", "bf16"), ("d4", "int8"), ("none", "fp32")])
def test_infer_option_choices(tta: str, precision: str) -> None:
    options = validate(with_value(MINIMAL_INFER, ("options",), {"tta": tta, "precision": precision})).options
    assert (options.tta, options.precision) == (tta, precision)


def test_infer_selected_channels_empty_means_all_and_must_match_num_channels() -> None:
    assert (
        validate(with_value(MINIMAL_INFER, ("input_config", "selected_channels"), [])).input_config.selected_channels
        == []
    )
    body = with_value(MINIMAL_INFER, ("input_config",), {"num_channels": 2, "selected_channels": [0, 1, 2]})
    assert single_error(body)["loc"] == ("input_config", "selected_channels")


def test_infer_normalization_keeps_unsent_fields_unset_across_a_reload() -> None:
    body = with_value(MINIMAL_INFER, ("input_config", "normalization"), {"strategy": "MIN_MAX", "fixed_max": 4095})
    request = validate(body)
    normalization = request.input_config.normalization
    assert normalization.model_dump(exclude_none=True) == {"strategy": "min_max", "max": 4095.0}
    reloaded = validate(request.model_dump(mode="json")).input_config.normalization
    assert reloaded.model_dump(exclude_none=True) == {"strategy": "min_max", "max": 4095.0}


def test_infer_normalization_bounds_are_checked_when_both_are_sent() -> None:
    bad = with_value(MINIMAL_INFER, ("input_config", "normalization"), {"min": 9, "max": 3})
    assert single_error(bad)["loc"] == ("input_config", "normalization", "max")
    lengths = with_value(MINIMAL_INFER, ("input_config",), {"num_channels": 2, "normalization": {"min": [0, 0, 0]}})
    assert single_error(lengths)["loc"] == ("input_config", "normalization")


# --- query kinds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder-info", "architecture-info"])
@pytest.mark.parametrize(("name", "loc"), [(None, ("name",)), ("", ("name",)), ("  ", ("name",))])
def test_info_queries_need_a_name(kind: str, name: Any, loc: tuple[str, ...]) -> None:
    body: dict[str, Any] = {"kind": kind} if name is None else {"kind": kind, "name": name}
    assert single_error(body)["loc"] == loc


def test_info_queries_keep_the_name_as_sent() -> None:
    # The catalogue resolves aliases and answers not-found; the schema does not.
    assert isinstance(validate({"kind": "encoder-info", "name": "efficientnet-b1"}), EncoderInfoRequest)
    request = validate({"kind": "architecture-info", "name": "UNet++"})
    assert isinstance(request, ArchitectureInfoRequest) and request.name == "UNet++"


def test_layers_defaults_and_architecture_normalisation() -> None:
    request = validate({"kind": "layers", "architecture": "DeepLabV3+", "encoder": "resnet18"})
    assert isinstance(request, LayersRequest)
    assert (request.architecture, request.encoder, request.num_channels, request.num_classes) == (
        "deeplabv3plus",
        "resnet18",
        3,
        2,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_channels", 0),
        ("num_channels", 129),
        ("num_classes", 1),
        ("num_classes", 1025),
        ("architecture", "segnet"),
        ("encoder", ""),
    ],
)
def test_layers_bounds(field: str, value: Any) -> None:
    body = {"kind": "layers", "architecture": "unet", "encoder": "resnet18", field: value}
    assert single_error(body)["loc"] == (field,)


def test_layers_needs_architecture_and_encoder() -> None:
    assert sorted(error_locs({"kind": "layers"})) == [("architecture",), ("encoder",)]


@pytest.mark.parametrize("size", ["small", "medium", "large"])
def test_freeze_recommendations_sizes(size: str) -> None:
    request = validate({"kind": "freeze-recommendations", "dataset_size": size, "encoder": "resnet50_lunit-swav"})
    assert isinstance(request, FreezeRecommendationsRequest)
    assert (request.dataset_size, request.encoder) == (size, "resnet50_lunit-swav")


@pytest.mark.parametrize("size", ["huge", "Small", None])
def test_freeze_recommendations_rejects_other_sizes(size: Any) -> None:
    assert single_error({"kind": "freeze-recommendations", "dataset_size": size})["loc"] == ("dataset_size",)


def test_freeze_recommendations_encoder_is_optional() -> None:
    assert validate({"kind": "freeze-recommendations", "dataset_size": "medium"}).encoder is None
