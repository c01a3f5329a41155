"""Model folders on disk: listing them for the `models` query, in either metadata schema.

A model folder is `<models dir>/<model id>/` holding `metadata.json` written by dlwatchd (server
schema) or rewritten by the QuPath extension (client schema). Both carry `architecture.type`; the
id and name fall back to the folder name. No torch here: listing must stay cheap.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
