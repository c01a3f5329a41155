"""Model ids and atomic publication of model folders (ENGINE §11.1), next to the existing listing."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from dlwatchd.artifacts.model_store import list_models, new_model_id, publish_model

NOON = datetime(2025, 3, 4, 12, 5, 9, tzinfo=timezone.utc)


def write_files(folder: Path) -> None:
    (folder / "model.pt").write_bytes(b"weights")
    # No "id": the listing then names the model after its folder, which shows where it ended up.
    (folder / "metadata.json").write_text(json.dumps({"architecture": {"type": "unet"}}))
    (folder / "training_history.json").write_text("[]")


def test_new_model_id_format_and_collisions(tmp_path: Path) -> None:
    assert new_model_id(tmp_path, "unet", NOON) == "unet_20250304_120509"
    (tmp_path / "unet_20250304_120509").mkdir()
    assert new_model_id(tmp_path, "unet", NOON) == "unet_20250304_120509_2"
    (tmp_path / "unet_20250304_120509_2").mkdir()
    (tmp_path / "unet_20250304_120509_3").write_text("a file takes the name too")
    assert new_model_id(tmp_path, "unet", NOON) == "unet_20250304_120509_4"
    assert new_model_id(tmp_path, "fpn", NOON) == "fpn_20250304_120509"


def test_new_model_id_without_a_clock_and_without_the_folder(tmp_path: Path) -> None:
    model_id = new_model_id(tmp_path / "not-yet", "deeplabv3plus")
    prefix, date, time = model_id.rsplit("_", 2)
    assert prefix == "deeplabv3plus" and len(date) == 8 and len(time) == 6
    assert date.isdigit() and time.isdigit()


def test_publish_model_success_is_complete(tmp_path: Path) -> None:
    models = tmp_path / "models"
    final = publish_model(models, "unet_20250304_120509", write_files)
    assert final == models / "unet_20250304_120509"
    assert sorted(p.name for p in final.iterdir()) == ["metadata.json", "model.pt", "training_history.json"]
    assert (final / "model.pt").read_bytes() == b"weights"
    assert [p.name for p in models.iterdir()] == ["unet_20250304_120509"]  # no temp folder left
    assert [m["id"] for m in list_models([models]).models] == ["unet_20250304_120509"]


def test_publish_model_never_replaces_an_existing_folder(tmp_path: Path) -> None:
    taken = tmp_path / "unet_x"
    taken.mkdir()
    (taken / "keep.txt").write_text("older model")
    empty = tmp_path / "unet_x_2"
    empty.mkdir()  # even an empty folder is someone's claim
    final = publish_model(tmp_path, "unet_x", write_files)
    assert final == tmp_path / "unet_x_3"
    assert (taken / "keep.txt").read_text() == "older model"
    assert list(empty.iterdir()) == []
    assert (final / "model.pt").is_file()


def test_publish_model_failure_leaves_nothing(tmp_path: Path) -> None:
    def half_written(folder: Path) -> None:
        (folder / "model.pt").write_bytes(b"weights")
        (folder / "sub").mkdir()
        (folder / "sub" / "part").write_bytes(b"x")
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        publish_model(tmp_path, "unet_y", half_written)
    assert list(tmp_path.iterdir()) == []


def test_publish_model_cleans_up_on_keyboard_interrupt(tmp_path: Path) -> None:
    def interrupted(folder: Path) -> None:
        (folder / "model.pt").write_bytes(b"w")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_model(tmp_path, "unet_z", interrupted)
    assert list(tmp_path.iterdir()) == []


def test_temp_folder_is_hidden_from_listings_while_assembling(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def files(folder: Path) -> None:
        write_files(folder)
        assert folder.parent == tmp_path and folder.name.startswith(".tmp-unet_w-")
        seen.append([m["id"] for m in list_models([tmp_path]).models])

    publish_model(tmp_path, "unet_w", files)
    assert seen == [[]]
    assert [m["id"] for m in list_models([tmp_path]).models] == ["unet_w"]


def test_publish_model_takes_the_next_id_when_the_name_is_taken_meanwhile(tmp_path: Path) -> None:
    def racing(folder: Path) -> None:
        write_files(folder)
        (tmp_path / "unet_r").mkdir()  # another training finished in the same second and published first
        (tmp_path / "unet_r" / "metadata.json").write_text("{}")

    final = publish_model(tmp_path, "unet_r", racing)
    assert final == tmp_path / "unet_r_2"
    assert (tmp_path / "unet_r" / "metadata.json").read_text() == "{}"
    assert (final / "model.pt").is_file()


def test_a_suffixed_id_is_written_into_the_metadata(tmp_path: Path) -> None:
    def files(folder: Path) -> None:
        (folder / "metadata.json").write_text(json.dumps({"id": "unet_s", "architecture": {"type": "unet"}}))
        (tmp_path / "unet_s").mkdir()  # taken while this model was being written

    final = publish_model(tmp_path, "unet_s", files)
    assert final.name == "unet_s_2"
    assert json.loads((final / "metadata.json").read_text())["id"] == "unet_s_2"
    assert [m["id"] for m in list_models([tmp_path]).models] == ["unet_s_2"]
