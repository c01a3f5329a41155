"""Model folders on disk: listing them for the `models` query (either metadata schema) and publishing new ones.

A model folder is `<models dir>/<model id>/` holding `metadata.json` written by dlwatchd (server
schema) or rewritten by the QuPath extension (client schema). Both carry `architecture.type`; the
id and name fall back to the folder name. No torch here: listing must stay cheap.

A new model is assembled in a dot-named sibling folder (which listings skip) and renamed into place,
so a reader sees either no folder or a complete one (ENGINE §11.1).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dlwatchd.spool.atomic import fsync_dir, write_json_atomic

logger = logging.getLogger("dlwatchd.models")

METADATA_NAME = "metadata.json"


@dataclass
class ModelListing:
    models: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def answer(self) -> dict[str, Any]:
        """The `models` result: {"models": [{id, name, type, path}], "warnings": [...]}, sorted by id."""
        return {"models": sorted(self.models, key=lambda m: m["id"]), "warnings": self.warnings}


def summarize_model(model_dir: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """The listing entry of one model folder from its metadata (either schema)."""
    architecture = metadata.get("architecture")
    model_type = architecture.get("type") if isinstance(architecture, dict) else None
    model_id = metadata.get("id")
    name = metadata.get("name")
    return {
        "id": model_id if isinstance(model_id, str) and model_id else model_dir.name,
        "name": name if isinstance(name, str) and name else model_dir.name,
        "type": model_type if isinstance(model_type, str) and model_type else "unknown",
        "path": str(model_dir),
    }


def list_models(model_dirs: list[Path]) -> ModelListing:
    """Every `<dir>/*/metadata.json` in the given folders, first folder first.

    A later model with an id already listed is left out with a warning; an unreadable metadata file is
    left out with a warning. A missing folder is skipped silently (the spool's models/ may be empty).
    """
    listing = ModelListing()
    seen: dict[str, str] = {}
    for models_dir in model_dirs:
        try:
            names = sorted(os.listdir(models_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            listing.warnings.append(f"The model folder {models_dir} cannot be read: {exc.strerror}.")
            continue
        for name in names:
            if name.startswith("."):
                continue  # a model still being assembled, or a client's temp folder
            metadata_path = models_dir / name / METADATA_NAME
            try:
                metadata = json.loads(metadata_path.read_bytes())
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                listing.warnings.append(
                    f"The model {models_dir / name} was left out: {METADATA_NAME} is unreadable ({exc})."
                )
                continue
            if not isinstance(metadata, dict):
                listing.warnings.append(
                    f"The model {models_dir / name} was left out: {METADATA_NAME} is not an object."
                )
                continue
            entry = summarize_model(models_dir / name, metadata)
            if entry["id"] in seen:
                listing.warnings.append(
                    f"The model {entry['path']} has the id '{entry['id']}' of {seen[entry['id']]}; it was left out."
                )
                continue
            seen[entry["id"]] = entry["path"]
            listing.models.append(entry)
    return listing


ID_TIME_FORMAT = "%Y%m%d_%H%M%S"
# Enough for a burst of models finishing in the same second; past it something loops and should fail loudly.
MAX_ID_SUFFIX = 10_000


def new_model_id(models_dir: Path, model_type: str, now: datetime | None = None) -> str:
    """`<model_type>_<YYYYmmdd_HHMMSS>` (UTC unless `now` says otherwise), then `_2`, `_3`, ... while taken.

    Only names of existing folders (and files) count as taken; the caller must still publish with
    `publish_model`, which re-checks at rename time.
    """
    stamp = (now or datetime.now(timezone.utc)).strftime(ID_TIME_FORMAT)
    return _free_id(models_dir, f"{model_type}_{stamp}")


def publish_model(models_dir: Path, model_id: str, files: Callable[[Path], None]) -> Path:
    """Assemble a model folder with `files(tmp_dir)` and rename it to `models_dir/<id>`; returns the final path.

    The id gets the next free `_N` suffix if `model_id` was taken meanwhile (an existing folder is never
    replaced), and then a `metadata.json` whose `id` is `model_id` gets the final id before the rename, so
    listings never see two models with one id. Every file is fsynced before the rename and the parent after it.
    On any exception (from `files` or the filesystem) the temporary folder is removed and the exception
    re-raised: nothing half-written is visible.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = models_dir / f".tmp-{model_id}-{secrets.token_hex(4)}"
    tmp_dir.mkdir()
    try:
        files(tmp_dir)
        _fsync_tree(tmp_dir)
        final = _claim_free(models_dir, model_id)
        try:
            if final.name != model_id:
                _retarget_metadata(tmp_dir, model_id, final.name)
            # Replaces our own empty placeholder: rename onto an empty folder is atomic on POSIX.
            os.rename(tmp_dir, final)
        except BaseException:
            try:
                final.rmdir()
            except OSError:
                pass  # not empty: someone else's files appeared inside, so it is not ours to remove
            raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    fsync_dir(models_dir)
    return final


def _free_id(models_dir: Path, base: str) -> str:
    for suffix in range(1, MAX_ID_SUFFIX + 1):
        candidate = base if suffix == 1 else f"{base}_{suffix}"
        if not os.path.lexists(models_dir / candidate):
            return candidate
    raise FileExistsError(f"{MAX_ID_SUFFIX} model folders named {base}_N already exist in {models_dir}")


def _claim_free(models_dir: Path, model_id: str) -> Path:
    # mkdir is the atomic claim: a bare rename would silently replace a folder another publisher just created
    # empty, and an existence check alone races with a second training finishing in the same second.
    while True:
        final = models_dir / _free_id(models_dir, model_id)
        try:
            final.mkdir()
        except FileExistsError:
            continue  # claimed between the check and the mkdir: try the next suffix
        return final


def _retarget_metadata(folder: Path, old_id: str, new_id: str) -> None:
    path = folder / METADATA_NAME
    try:
        metadata = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return  # no dlwatchd metadata to fix: the folder name is the id then
    if isinstance(metadata, dict) and metadata.get("id") == old_id:
        metadata["id"] = new_id
        write_json_atomic(path, metadata, dir_sync=True)


def _fsync_tree(root: Path) -> None:
    for directory, _subdirs, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))
