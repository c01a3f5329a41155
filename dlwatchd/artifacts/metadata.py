"""Model metadata: writing `metadata.json` / `preprocessing.json` (ENGINE §11.3-11.4) and reading either schema (§11.5).

dlwatchd writes the server schema. The QuPath extension replaces `metadata.json` with its own (client) schema when it
copies a model folder, which loses the channel count and normalization details; `preprocessing.json` keeps them, so
readers prefer it. No torch here: reading metadata must stay cheap for listings and the supervisor.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlwatchd.errors import DlwatchdError, ErrorCode

SCHEMA = "dlwatchd-metadata/1"
METADATA_NAME = "metadata.json"
PREPROCESSING_NAME = "preprocessing.json"
PREPROCESSING_KEYS = ("architecture", "input_config", "classes", "unlabeled_index", "normalization_stats")
DEFAULT_ENCODER = "resnet34"
DEFAULT_UNLABELED_INDEX = 255
DEFAULT_SIZE_DIVISOR = 32
# Module name -> distribution names to try; onnxruntime ships under several names (GPU builds).
VERSIONED_PACKAGES = {
    "torch": ("torch",),
    "segmentation_models_pytorch": ("segmentation-models-pytorch", "segmentation_models_pytorch"),
    "timm": ("timm",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-silicon", "onnxruntime-directml"),
    "numpy": ("numpy",),
}


def build_metadata(
    *,
    model_id: str,
    model_type: str,
    architecture: dict[str, Any],
    input_config: dict[str, Any],
    classes: list[str],
    unlabeled_index: int,
    normalization_stats: list[dict[str, Any]],
    training: dict[str, Any],
    onnx: dict[str, Any],
    extra_architecture: dict[str, Any],
) -> dict[str, Any]:
    """The server-schema `metadata.json` object, keys in the §11.3 order.

    `architecture` holds the request keys, `extra_architecture` the added ones; `type` (= `model_type` as given)
    comes first. The result is JSON-safe: non-finite floats become None, tuples and numpy/torch values plain JSON.
    """
    arch = {"type": model_type}
    arch.update((key, value) for key, value in architecture.items() if key != "type")
    arch.update((key, value) for key, value in extra_architecture.items() if key != "type")
    metadata = {
        "id": model_id,
        "name": f"{model_type.upper()} Classifier",
        "architecture": arch,
        "input_config": input_config,
        "classes": [{"index": index, "name": name} for index, name in enumerate(classes)],
        "unlabeled_index": unlabeled_index,
        "normalization_stats": normalization_stats,
        "training": training,
        "onnx": onnx,
        "versions": package_versions(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "schema": SCHEMA,
    }
    return json_safe(metadata)


def build_preprocessing(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `preprocessing.json` object (§11.4): a copy of the five keys readers need verbatim."""
    return json_safe({key: metadata.get(key) for key in PREPROCESSING_KEYS})


def package_versions() -> dict[str, str | None]:
    """Versions of dlwatchd, Python and the engine's packages; a missing package is None. Imports nothing heavy."""
    from dlwatchd import __version__

    versions: dict[str, str | None] = {"dlwatchd": __version__, "python": platform.python_version()}
    for module, distributions in VERSIONED_PACKAGES.items():
        versions[module] = _installed_version(module, distributions)
    return versions


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None, tuples as lists, numpy/torch scalars and arrays as plain JSON."""
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy / torch, without importing either
        return json_safe(value.tolist())
    return value


@dataclass
class ModelInfo:
    """What inference and listings need from a model folder, in either metadata schema.

    `encoder` is the stored name (a histology name maps to its smp base only when building); `input_size` is
    (height, width); `in_channels` is None when the metadata does not say (the weights decide then).
    """

    model_dir: Path
    model_id: str
    name: str
    architecture: str
    encoder: str
    in_channels: int | None
    num_classes: int
    class_names: list[str]
    normalization: dict[str, Any] | None
    selected_channels: list[int] | None
    input_size: tuple[int, int] | None
    size_divisor: int
    channel_names: list[str] | None
    bit_depth: int | None
    unlabeled_index: int
    warnings: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def read_model_info(model_dir: Path) -> ModelInfo:
    """The ModelInfo of `model_dir` from `metadata.json`, with `preprocessing.json` winning where present.

    Raises E_NOT_FOUND when the folder or its metadata.json is missing, E_SCHEMA when metadata.json is unreadable
    or lacks `architecture.type` (there is no default architecture), or a field has the wrong type.
    """
    model_dir = Path(model_dir)
    raw = _read_metadata(model_dir)
    warnings: list[str] = []
    view = dict(raw)
    view.update(_read_preprocessing(model_dir, warnings))
    arch = _section(view, "architecture", model_dir)
    model_type = arch.get("type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The model {model_dir} has no architecture.type in its metadata, so it cannot be rebuilt.",
            hint='Add the architecture type (e.g. "unet") to metadata.json, as the model was trained with.',
            field="architecture.type",
        )
    input_config = _section(view, "input_config", model_dir)
    channel_config = _section(view, "channel_config", model_dir)
    class_names = _class_names(view.get("classes"), arch, model_dir, warnings)
    encoder = arch.get("backbone")
    if not isinstance(encoder, str) or not encoder:
        encoder = DEFAULT_ENCODER
        warnings.append(f"The model {model_dir} names no backbone; {DEFAULT_ENCODER} is assumed.")
    in_channels = _first_int(
        model_dir,
        [
            ("input_config.num_channels", input_config.get("num_channels")),
            ("architecture.in_channels", arch.get("in_channels")),
            ("architecture.input_channels", arch.get("input_channels")),
        ],
    )
    # The client schema has no U; 255 is the training default (ENGINE §3.2).
    unlabeled = _as_int(model_dir, "unlabeled_index", view.get("unlabeled_index"))
    model_id, name = raw.get("id"), raw.get("name")
    return ModelInfo(
        model_dir=model_dir,
        model_id=model_id if isinstance(model_id, str) and model_id else model_dir.name,
        name=name if isinstance(name, str) and name else model_dir.name,
        architecture=model_type,
        encoder=encoder,
        in_channels=in_channels,
        num_classes=len(class_names),
        class_names=class_names,
        normalization=_normalization(input_config, channel_config, model_dir),
        selected_channels=_int_list(model_dir, "input_config.selected_channels", input_config.get("selected_channels")),
        input_size=_input_size(arch, model_dir),
        size_divisor=_size_divisor(arch, model_type, model_dir),
        channel_names=_names(input_config.get("channel_names")) or _names(channel_config.get("expected_channels")),
        bit_depth=_first_int(
            model_dir,
            [
                ("input_config.bit_depth", input_config.get("bit_depth")),
                ("channel_config.bit_depth_trained", channel_config.get("bit_depth_trained")),
            ],
        ),
        unlabeled_index=DEFAULT_UNLABELED_INDEX if unlabeled is None else unlabeled,
        warnings=warnings,
        raw=raw,
    )


def _installed_version(module: str, distributions: tuple[str, ...]) -> str | None:
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if isinstance(version, str):
        return version
    for distribution in distributions:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _read_metadata(model_dir: Path) -> dict[str, Any]:
    path = model_dir / METADATA_NAME
    if not model_dir.is_dir():
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The model folder {model_dir} does not exist.")
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DlwatchdError(ErrorCode.NOT_FOUND, f"The model folder {model_dir} has no {METADATA_NAME}.") from None
    except (OSError, ValueError) as exc:
        raise DlwatchdError(
            ErrorCode.SCHEMA, f"The {METADATA_NAME} of the model {model_dir} is unreadable: {exc}."
        ) from exc
    if not isinstance(data, dict):
        raise DlwatchdError(ErrorCode.SCHEMA, f"The {METADATA_NAME} of the model {model_dir} is not a JSON object.")
    return data


def _read_preprocessing(model_dir: Path, warnings: list[str]) -> dict[str, Any]:
    path = model_dir / PREPROCESSING_NAME
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        # metadata.json alone is still a complete description in either schema, so this is not fatal.
        warnings.append(f"The {PREPROCESSING_NAME} of the model {model_dir} is unreadable ({exc}); it was ignored.")
        return {}
    if not isinstance(data, dict):
        warnings.append(f"The {PREPROCESSING_NAME} of the model {model_dir} is not an object; it was ignored.")
        return {}
    return {key: data[key] for key in PREPROCESSING_KEYS if data.get(key) is not None}


def _section(view: dict[str, Any], key: str, model_dir: Path) -> dict[str, Any]:
    value = view.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DlwatchdError(
            ErrorCode.SCHEMA, f"The metadata of the model {model_dir} has a {key} that is not an object.", field=key
        )
    return value


def _class_names(classes: Any, arch: dict[str, Any], model_dir: Path, warnings: list[str]) -> list[str]:
    if not classes:
        count = _first_int(model_dir, [("architecture.num_classes", arch.get("num_classes"))])
        if not count:
            raise DlwatchdError(
                ErrorCode.SCHEMA, f"The metadata of the model {model_dir} lists no classes.", field="classes"
            )
        warnings.append(f"The model {model_dir} lists no class names; they are numbered instead.")
        return [f"Class {index}" for index in range(count)]
    if not isinstance(classes, list):
        raise DlwatchdError(ErrorCode.SCHEMA, f"The classes of the model {model_dir} are not a list.", field="classes")
    indexed: dict[int, str] = {}
    for position, entry in enumerate(classes):
        if isinstance(entry, str):
            index, name = position, entry
        elif isinstance(entry, dict):
            index = _required_int(model_dir, f"classes[{position}].index", entry.get("index", position))
            stored = entry.get("name")
            name = stored if isinstance(stored, str) and stored else f"Class {index}"
        else:
            raise DlwatchdError(
                ErrorCode.SCHEMA, f"The class entry {entry!r} of the model {model_dir} is neither a name nor an object."
            )
        if index in indexed:
            raise DlwatchdError(ErrorCode.SCHEMA, f"The model {model_dir} lists the class index {index} twice.")
        indexed[index] = name
    if sorted(indexed) != list(range(len(indexed))):
        # Output channel i is the i-th class in index order; a gap usually means a hand-edited class list.
        warnings.append(f"The class indices of the model {model_dir} are not 0..{len(indexed) - 1}: {sorted(indexed)}.")
    return [indexed[index] for index in sorted(indexed)]


def _normalization(input_config: dict[str, Any], channel_config: dict[str, Any], model_dir: Path) -> dict | None:
    stored = input_config.get("normalization")
    if isinstance(stored, dict):
        normalization = dict(stored)
        if isinstance(normalization.get("strategy"), str):
            normalization["strategy"] = normalization["strategy"].lower()
        return normalization
    if stored is not None:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The input_config.normalization of the model {model_dir} is not an object.",
            field="input_config.normalization",
        )
    strategy = channel_config.get("normalization_strategy")
    if isinstance(strategy, str) and strategy:
        # The client schema stores the strategy only; per_channel etc. come from the request (ENGINE §12.3).
        return {"strategy": strategy.lower()}
    return None


def _input_size(arch: dict[str, Any], model_dir: Path) -> tuple[int, int] | None:
    size = arch.get("input_size")
    if size is None:
        height = _as_int(model_dir, "architecture.input_height", arch.get("input_height"))
        width = _as_int(model_dir, "architecture.input_width", arch.get("input_width"))
        if height is None and width is None:
            return None
        if height is None or width is None:  # one side given: the tile was square
            side = height if height is not None else width
            return (side, side) if side is not None else None
        return (height, width)
    if not isinstance(size, list):
        side = _as_int(model_dir, "architecture.input_size", size)
        return None if side is None else (side, side)
    sides = _int_list(model_dir, "architecture.input_size", size) or []
    if len(sides) != 2:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The architecture.input_size of the model {model_dir} is not [height, width]: {size!r}.",
            field="architecture.input_size",
        )
    return (sides[0], sides[1])


def _size_divisor(arch: dict[str, Any], model_type: str, model_dir: Path) -> int:
    stored = _as_int(model_dir, "architecture.size_divisor", arch.get("size_divisor"))
    if stored:
        return stored
    from dlwatchd.catalog.architectures import resolve_architecture

    try:
        return resolve_architecture(model_type).size_divisor
    except DlwatchdError:  # custom_onnx or an architecture this version does not know
        return DEFAULT_SIZE_DIVISOR


def _names(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [str(item) for item in value]


def _int_list(model_dir: Path, key: str, value: Any) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise DlwatchdError(ErrorCode.SCHEMA, f"The {key} of the model {model_dir} is not a list.", field=key)
    return [_required_int(model_dir, f"{key}[{position}]", item) for position, item in enumerate(value)]


def _required_int(model_dir: Path, key: str, value: Any) -> int:
    number = _as_int(model_dir, key, value)
    if number is None:
        raise DlwatchdError(ErrorCode.SCHEMA, f"The {key} of the model {model_dir} is missing (null).", field=key)
    return number


def _first_int(model_dir: Path, candidates: list[tuple[str, Any]]) -> int | None:
    for key, value in candidates:
        number = _as_int(model_dir, key, value)
        if number is not None:
            return number
    return None


def _as_int(model_dir: Path, key: str, value: Any) -> int | None:
    """`value` as an int: ints, integral floats and integer strings ("4", "4.0"); None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        return value
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    else:
        number = None
    if number is not None and math.isfinite(number) and number == int(number):
        return int(number)
    raise DlwatchdError(
        ErrorCode.SCHEMA, f"The {key} of the model {model_dir} is not a whole number: {value!r}.", field=key
    )
