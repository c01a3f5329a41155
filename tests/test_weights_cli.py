"""`dlwatchd weights import` and `dlwatchd weights list` as subprocesses, with a real weights file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import get_encoder

TIMEOUT = 120


def dlwatchd(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlwatchd", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})},
    )


def resnet18_file(folder: Path) -> Path:
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.randn(value.shape, generator=generator) if value.is_floating_point() else value
        for key, value in get_encoder("resnet18", weights=None).state_dict().items()
    }
    path = folder / "resnet18.safetensors"
    save_file(state, path)
    return path


def test_import_then_list(tmp_path: Path) -> None:
    store = tmp_path / "weights"
    source = resnet18_file(tmp_path)

    imported = dlwatchd("weights", "import", "resnet18", str(source), "--weights-dir", str(store), cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert "imported imagenet weights for resnet18" in imported.stdout
    assert (store / "resnet18" / "imagenet.safetensors").is_file()

    listed = dlwatchd("weights", "list", "--weights-dir", str(store), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("resnet18"))
    assert "imagenet" in row and "MIT (torchvision)" in row

    # The environment variable names the default store.
    as_json = dlwatchd("weights", "list", "--json", cwd=tmp_path, env={"DLWATCHD_WEIGHTS_DIR": str(store)})
    assert as_json.returncode == 0, as_json.stderr
    [entry] = json.loads(as_json.stdout)["entries"]
    assert (entry["encoder"], entry["tag"], entry["source"]) == ("resnet18", "imagenet", str(source))


def test_import_that_does_not_fit_exits_2_with_the_code(tmp_path: Path) -> None:
    store = tmp_path / "weights"
    source = resnet18_file(tmp_path)
    done = dlwatchd(
        "weights",
        "import",
        "efficientnet-b0",
        str(source),
        "--tag",
        "imagenet",
        "--weights-dir",
        str(store),
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "E_SCHEMA" in done.stderr and "efficientnet-b0" in done.stderr
    assert not (store / "efficientnet-b0").exists()


def test_empty_store_lists_nothing(tmp_path: Path) -> None:
    done = dlwatchd("weights", "list", "--weights-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert done.returncode == 0 and "No weights are installed" in done.stdout
