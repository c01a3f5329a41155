"""The offline weights store: pretrained encoder weights imported by hand, found without a network (ENGINE §6.5).

Layout: `<root>/<encoder>/<tag>.safetensors` (a hand-placed `<tag>.pth` is read too) plus `<root>/manifest.json`.
The supervisor calls `WeightsStore.available()` and never loads torch, so torch, safetensors and huggingface_hub
are imported inside the functions that need them, never at module level.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlwatchd.catalog import encoders as catalog
from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.atomic import write_bytes_atomic, write_json_atomic

if TYPE_CHECKING:
    import torch

TAGS = ("imagenet", "histology")
STORE_SUFFIXES = (".safetensors", ".pth")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin")
MANIFEST_NAME = "manifest.json"
# Below this share of the skeleton's tensors a file is someone else's network, not a partial match.
MIN_COVERAGE = 0.5

# Classification heads (torchvision fc, densenet/vgg/mobilenet classifier, pretrainedmodels last_linear, timm
# head.fc, lukemelas EfficientNet _fc) and smp model heads have no counterpart in a segmentation encoder.
_DROPPED_PREFIXES = ("fc.", "_fc.", "classifier.", "last_linear.", "head.fc.")
_SMP_HEAD_PREFIXES = ("decoder.", "segmentation_head.", "classification_head.")
_WRAPPER_PREFIXES = ("module.", "encoder.")
_UNWRAP_KEYS = ("state_dict", "model", "model_state_dict")
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")
# Encoder names become folder names; this keeps `..`, separators and odd characters out of the store.
_ENCODER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")


def missing_weights_error(encoder: str, tag: str) -> DlwatchdError:
    """The E_WEIGHTS_UNAVAILABLE error every caller raises when (encoder, tag) has no local weights."""
    return DlwatchdError(
        ErrorCode.WEIGHTS_UNAVAILABLE,
        f"No {tag} weights for the encoder '{encoder}' are installed on this machine.",
        hint=(
            f"Import them with `dlwatchd weights import {encoder} <file> --tag {tag}`, or set use_pretrained to false."
        ),
    )


def clean_state_dict(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Encoder tensors of a checkpoint: wrapper prefixes stripped, classification and smp heads dropped.

    A full smp model (encoder.* next to decoder.*) keeps only its encoder; non-tensor values are ignored.
    """
    import torch

    cleaned: dict[str, torch.Tensor] = {}
    for raw_key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = str(raw_key)
        if key.startswith(_SMP_HEAD_PREFIXES):
            continue
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        if key.startswith(_SMP_HEAD_PREFIXES + _DROPPED_PREFIXES):
            continue
        cleaned[key] = value
    return cleaned


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The cleaned tensors of a .safetensors file or a .pth/.pt/.bin state dict or checkpoint (never unpickled code).

    Raises E_UNSAFE_MODEL for a pickle that needs code to load, E_SCHEMA for anything else unreadable.
    """
    import torch

    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path), device="cpu")
        elif suffix in CHECKPOINT_SUFFIXES:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                f"{path} is not a weights file dlwatchd reads.",
                hint="Use a .safetensors file, a .pth/.pt/.bin state dict, or a Hugging Face cache folder.",
            )
    except (DlwatchdError, OSError):  # already clear: our own message, or a missing/unreadable file
        raise
    except Exception as exc:  # torch.load and safetensors raise many exception types for a bad file
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise DlwatchdError(
                ErrorCode.UNSAFE_MODEL,
                f"{path} holds Python objects beyond tensors and is not loaded: unpickling them could run code.",
                hint="Save the state dict alone (torch.save(model.state_dict(), path)) or as safetensors.",
            ) from exc
        raise DlwatchdError(ErrorCode.SCHEMA, f"{path} cannot be read as weights: {exc}") from exc
    # Training checkpoints wrap the weights, sometimes twice ({"model": {"state_dict": ...}}).
    while isinstance(raw, Mapping):
        inner = next((raw[k] for k in _UNWRAP_KEYS if isinstance(raw.get(k), Mapping)), None)
        if inner is None:
            break
        raw = inner
    tensors = clean_state_dict(raw) if isinstance(raw, Mapping) else {}
    if not tensors:
        raise DlwatchdError(ErrorCode.SCHEMA, f"{path} contains no encoder tensors.")
    return tensors


def find_in_hub_folder(folder: Path) -> Path:
    """The weights file of a copied Hugging Face cache folder (`models--org--name` or one of its snapshots).

    The snapshot refs/main names comes first, then the others newest first; model.safetensors beats pytorch_model.bin.
    Raises E_NOT_FOUND when the folder holds neither.
    """
    snapshots = folder / "snapshots"
    candidates: list[Path] = []
    if snapshots.is_dir():
        main_ref = folder / "refs" / "main"
        if main_ref.is_file():
            candidates.append(snapshots / main_ref.read_text(encoding="utf-8").strip())
        others = [p for p in snapshots.iterdir() if p.is_dir() and p not in candidates]
        candidates += sorted(others, key=lambda p: p.stat().st_mtime, reverse=True)
    else:
        candidates.append(folder)
    for snapshot in candidates:
        for name in _HUB_FILES:
            if (snapshot / name).is_file():
                return snapshot / name
    raise DlwatchdError(
        ErrorCode.NOT_FOUND,
        f"The folder {folder} holds no {' or '.join(_HUB_FILES)} in a snapshot.",
        hint="Pass a `models--<org>--<name>` folder from a Hugging Face cache, a snapshot of one, or a weights file.",
    )


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as the environment names it now (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_sources(encoder: str, tag: str) -> list[tuple[str, str | None, str]]:
    """(repo_id, revision, filename) places in the hub cache where (encoder, tag) weights may lie, best first."""
    if tag == "histology":
        hub_id = catalog.get_encoder(encoder).hub_id if catalog.is_histology(encoder) else None
        if not hub_id:
            return []
        return [(hub_id.removeprefix("hf_hub:"), None, name) for name in _HUB_FILES]
    from segmentation_models_pytorch.encoders import encoders as smp_encoders

    settings = smp_encoders.get(catalog.encoder_base(encoder), {}).get("pretrained_settings", {}).get(tag)
    if not settings:
        return []
    # smp pins a revision; a cache filled by another smp version holds the same repository under another one.
    return [
        (settings["repo_id"], settings.get("revision"), "model.safetensors"),
        (settings["repo_id"], None, "model.safetensors"),
    ]


def _license_of(encoder: str) -> str | None:
    try:
        return getattr(catalog.get_encoder(encoder), "license", None)
    except (DlwatchdError, KeyError, ValueError):
        return None  # any smp encoder is accepted; only catalogue rows have a licence on record


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class WeightsStore:
    """A folder of imported encoder weights plus the Hugging Face cache, read offline; see the module docstring."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, encoder: str, tag: str) -> Path:
        """Where import_file writes (encoder, tag): `<root>/<encoder>/<tag>.safetensors`; E_SCHEMA on bad names."""
        self._check_names(encoder, tag)
        return self.root / encoder / f"{tag}.safetensors"

    def available(self, encoder: str, tag: str | None = None) -> bool:
        """Whether the store itself holds (encoder, tag) weights; torch-free, the hub cache is not consulted."""
        tag = tag or catalog.weights_tag(encoder)
        try:
            return self._stored_file(encoder, tag) is not None
        except DlwatchdError:
            return False

    def entries(self) -> list[dict[str, Any]]:
        """Manifest entries whose file still exists, plus hand-placed store files (with sha256 and source None)."""
        listed = [e for e in self._read_manifest() if self._stored_file_quiet(e.get("encoder"), e.get("tag"))]
        known = {(e["encoder"], e["tag"]) for e in listed}
        if self.root.is_dir():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                for tag in TAGS:
                    found = self._stored_file_quiet(folder.name, tag)
                    if found is None or (folder.name, tag) in known:
                        continue
                    listed.append(
                        {
                            "encoder": folder.name,
                            "tag": tag,
                            "sha256": None,
                            "source": None,
                            "license": _license_of(folder.name),
                            "imported_at": None,
                            "bytes": found.stat().st_size,
                        }
                    )
        return sorted(listed, key=lambda e: (e["encoder"], e["tag"]))

    def import_file(self, encoder: str, source: Path, tag: str | None = None) -> dict[str, Any]:
        """Verify a weights file or a copied hub cache folder against the encoder, store it, return its manifest entry.

        Raises E_NOT_FOUND (no such source), E_SCHEMA (unreadable, or it does not fit the encoder: nothing is written),
        E_UNSAFE_MODEL (a pickle with code). The weights file and the manifest are each replaced atomically.
        """
        from safetensors.torch import save

        tag = tag or catalog.weights_tag(encoder)
        target = self.path_for(encoder, tag)
        source = Path(source).expanduser().absolute()
        if not source.exists():
            raise DlwatchdError(ErrorCode.NOT_FOUND, f"The weights source {source} does not exist.")
        weights_file = find_in_hub_folder(source) if source.is_dir() else source
        tensors = read_weights_file(weights_file)
        verify_against_encoder(encoder, tensors, origin=weights_file)
        # safetensors refuses tensors that share storage or are views; clone gives each its own.
        data = save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, {"encoder": encoder})
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, data, dir_sync=True)
        entry = {
            "encoder": encoder,
            "tag": tag,
            "sha256": hashlib.sha256(data).hexdigest(),
            "source": str(weights_file),
            "license": _license_of(encoder),
            "imported_at": _now_iso(),
            "bytes": len(data),
        }
        with self._manifest_lock():
            kept = [e for e in self._read_manifest() if (e.get("encoder"), e.get("tag")) != (encoder, tag)]
            write_json_atomic(self.root / MANIFEST_NAME, {"entries": [*kept, entry]}, dir_sync=True)
        return entry

    def resolve(self, encoder: str, tag: str | None = None) -> Path | None:
        """The file holding (encoder, tag) weights: the store first, then the local hub cache; None when neither has it.

        Never touches the network: huggingface_hub is put in offline mode and only its cache lookup is used.
        """
        tag = tag or catalog.weights_tag(encoder)
        stored = self._stored_file(encoder, tag)
        if stored is not None:
            return stored
        if "huggingface_hub" not in sys.modules:
            os.environ["HF_HUB_OFFLINE"] = "1"
        from huggingface_hub import try_to_load_from_cache

        cache_dir = hub_cache_dir()
        for repo_id, revision, filename in hub_sources(encoder, tag):
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if isinstance(found, str):  # the other answers are None and a "known missing" sentinel
                return Path(found)
        return None

    def load(self, encoder: str, tag: str | None = None) -> dict[str, torch.Tensor]:
        """The cleaned encoder state dict for (encoder, tag). Raises missing_weights_error when nothing local has it."""
        tag = tag or catalog.weights_tag(encoder)
        path = self.resolve(encoder, tag)
        if path is None:
            raise missing_weights_error(encoder, tag)
        return read_weights_file(path)

    def _check_names(self, encoder: str, tag: str) -> None:
        if not _ENCODER_NAME_RE.match(encoder or "") or ".." in encoder:
            raise DlwatchdError(ErrorCode.SCHEMA, f"'{encoder}' is not a valid encoder name.", field="encoder")
        if tag not in TAGS:
            raise DlwatchdError(
                ErrorCode.SCHEMA, f"'{tag}' is not a weights tag; use one of {', '.join(TAGS)}.", field="tag"
            )

    def _stored_file(self, encoder: str, tag: str) -> Path | None:
        self._check_names(encoder, tag)
        for suffix in STORE_SUFFIXES:
            candidate = self.root / encoder / f"{tag}{suffix}"
            if candidate.is_file():
                return candidate
        return None

    def _stored_file_quiet(self, encoder: Any, tag: Any) -> Path | None:
        try:
            return self._stored_file(str(encoder), str(tag))
        except DlwatchdError:
            return None

    def _read_manifest(self) -> list[dict[str, Any]]:
        import json

        try:
            data = json.loads((self.root / MANIFEST_NAME).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []
        except (OSError, ValueError):
            return []  # a damaged manifest must not hide the weights; the next import rewrites it
        entries = data.get("entries") if isinstance(data, dict) else None
        return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []

    @contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        # Two imports at once would each rewrite the manifest from the same old copy and lose an entry.
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # Windows: imports are rare and interactive; go without the lock
            yield
            return
        with open(self.root / ".manifest.lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def verify_against_encoder(encoder: str, tensors: Mapping[str, torch.Tensor], *, origin: Path | str) -> None:
    """Check that `tensors` load into the 3-channel smp skeleton of `encoder`.

    Every key must exist there with an equal shape, and at least MIN_COVERAGE of the skeleton must be covered;
    otherwise E_SCHEMA saying what did not match. An encoder smp does not know is E_SCHEMA too.
    """
    import torch
    from segmentation_models_pytorch.encoders import get_encoder

    base = catalog.encoder_base(encoder)
    try:
        with torch.device("meta"):  # shapes only: no memory, no random initialisation
            skeleton = get_encoder(base, in_channels=3, weights=None).state_dict()
    except (KeyError, ValueError, RuntimeError) as exc:
        raise DlwatchdError(
            ErrorCode.SCHEMA, f"'{encoder}' is not an encoder this installation can build: {exc}"
        ) from exc
    unknown = [k for k in tensors if k not in skeleton]
    misshapen = [
        f"{k} {tuple(v.shape)} != {tuple(skeleton[k].shape)}"
        for k, v in tensors.items()
        if k in skeleton and v.shape != skeleton[k].shape
    ]
    covered = sum(1 for k in skeleton if k in tensors)
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys the encoder does not have (e.g. {', '.join(unknown[:5])})")
    if misshapen:
        problems.append(f"{len(misshapen)} keys with another shape (e.g. {'; '.join(misshapen[:5])})")
    if covered < MIN_COVERAGE * len(skeleton):
        problems.append(f"only {covered} of the encoder's {len(skeleton)} tensors are present")
    if problems:
        raise DlwatchdError(
            ErrorCode.SCHEMA,
            f"The weights in {origin} do not fit the encoder '{encoder}' (smp '{base}'): {'; '.join(problems)}.",
            hint="Check that the file was trained for this encoder; classification heads are dropped automatically.",
            field="encoder",
        )
