"""The offline weights store with real tensors: import paths, key cleaning, verification, hub cache, no network."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from segmentation_models_pytorch.encoders import encoders as smp_encoders
from segmentation_models_pytorch.encoders import get_encoder

from dlwatchd.engine.weights import WeightsStore, missing_weights_error
from dlwatchd.errors import DlwatchdError, ErrorCode

REPO = Path(__file__).resolve().parents[2]


def seeded_state(encoder: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The smp encoder's state dict with every tensor replaced by seeded random values (unlike any initialisation)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in get_encoder(encoder, weights=None).state_dict().items():
        if value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=generator)
        else:
            state[key] = torch.randint(0, 1000, value.shape, generator=generator, dtype=value.dtype)
    return state


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def resnet18_state() -> dict[str, torch.Tensor]:
    return seeded_state("resnet18")


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face hub cache the code under test must use instead of the real one."""
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(cache.parent))
    return cache


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every socket connection fail loudly and record the attempts."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network use is forbidden in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def lay_out_hub_repo(cache: Path, repo_id: str, revision: str, files: dict[str, bytes | Path]) -> Path:
    """A `models--org--name` folder as huggingface_hub writes it (refs/main naming the snapshot)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for name, content in files.items():
        (snapshot / name).write_bytes(content.read_bytes() if isinstance(content, Path) else content)
    return repo


def test_import_safetensors_then_load_returns_the_same_tensors(tmp_path: Path, resnet18_state: dict) -> None:
    source = tmp_path / "resnet18.safetensors"
    save_file(resnet18_state, source)
    store = WeightsStore(tmp_path / "store")
    assert not store.available("resnet18")

    entry = store.import_file("resnet18", source)

    stored = tmp_path / "store" / "resnet18" / "imagenet.safetensors"
    assert store.path_for("resnet18", "imagenet") == stored
    assert entry["encoder"] == "resnet18" and entry["tag"] == "imagenet"
    assert entry["sha256"] == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert entry["bytes"] == stored.stat().st_size
    assert entry["source"] == str(source)
    assert entry["license"] == "MIT (torchvision)"
    assert entry["imported_at"].endswith("Z")
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["entries"] == [entry]
    assert store.entries() == [entry]
    assert store.available("resnet18") and store.available("resnet18", "imagenet")
    assert not store.available("resnet18", "histology")
    assert_same_tensors(store.load("resnet18"), resnet18_state)
    assert not list(stored.parent.glob(".*.tmp")), "the atomic write left its temporary file behind"


def test_classification_checkpoint_is_unwrapped_and_cleaned(tmp_path: Path, resnet18_state: dict) -> None:
    wrapped = {f"module.{key}": value for key, value in resnet18_state.items()}
    wrapped["module.fc.weight"] = torch.randn(1000, 512)
    wrapped["module.fc.bias"] = torch.randn(1000)
    source = tmp_path / "checkpoint.pth"
    torch.save({"epoch": 90, "arch": "resnet18", "state_dict": wrapped}, source)
    store = WeightsStore(tmp_path / "store")

    store.import_file("resnet18", source)

    loaded = store.load("resnet18")
    assert "fc.weight" not in loaded
    assert_same_tensors(loaded, resnet18_state)


def test_reimport_replaces_the_manifest_entry(tmp_path: Path, resnet18_state: dict) -> None:
    store = WeightsStore(tmp_path / "store")
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(resnet18_state, first)
    save_file(seeded_state("resnet18", seed=1), second)
    store.import_file("resnet18", first)
    entry = store.import_file("resnet18", second)
    assert store.entries() == [entry]
    assert entry["source"] == str(second)


def test_import_from_a_copied_hub_cache_folder(tmp_path: Path, resnet18_state: dict) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(resnet18_state, weights)
    repo = lay_out_hub_repo(tmp_path / "copied", "smp-hub/resnet18.imagenet", "abc123", {"model.safetensors": weights})
    # An older snapshot with other values: refs/main, not this one, decides.
    stale = repo / "snapshots" / "old999"
    stale.mkdir()
    torch.save(seeded_state("resnet18", seed=7), stale / "pytorch_model.bin")

    store = WeightsStore(tmp_path / "store")
    entry = store.import_file("resnet18", repo)
    assert entry["source"] == str(repo / "snapshots" / "abc123" / "model.safetensors")
    assert_same_tensors(store.load("resnet18"), resnet18_state)

    other = WeightsStore(tmp_path / "store2")
    other.import_file("resnet18", stale)  # a snapshot folder itself, holding only pytorch_model.bin
    assert torch.equal(other.load("resnet18")["conv1.weight"], seeded_state("resnet18", seed=7)["conv1.weight"])


def test_folder_without_weights_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DlwatchdError) as info:
        WeightsStore(tmp_path / "store").import_file("resnet18", tmp_path / "empty")
    assert info.value.code is ErrorCode.NOT_FOUND


def test_weights_that_do_not_fit_are_rejected_and_nothing_is_written(tmp_path: Path, resnet18_state: dict) -> None:
    source = tmp_path / "resnet18.safetensors"
    save_file(resnet18_state, source)
    store = WeightsStore(tmp_path / "store")

    with pytest.raises(DlwatchdError) as info:
        store.import_file("efficientnet-b0", source)

    assert info.value.code is ErrorCode.SCHEMA
    assert "efficientnet-b0" in info.value.message
    assert f"{len(resnet18_state)} keys the encoder does not have" in info.value.message
    assert "only 0 of the encoder's" in info.value.message
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*"))
    assert not store.available("efficientnet-b0")


def test_wrong_shapes_are_named(tmp_path: Path, resnet18_state: dict) -> None:
    bad = dict(resnet18_state)
    bad["conv1.weight"] = torch.randn(64, 4, 7, 7)
    source = tmp_path / "bad.safetensors"
    save_file(bad, source)
    with pytest.raises(DlwatchdError) as info:
        WeightsStore(tmp_path / "store").import_file("resnet18", source)
    assert info.value.code is ErrorCode.SCHEMA
    assert "conv1.weight (64, 4, 7, 7) != (64, 3, 7, 7)" in info.value.message


def test_too_few_keys_are_rejected(tmp_path: Path, resnet18_state: dict) -> None:
    partial = {k: v for k, v in resnet18_state.items() if k.startswith(("conv1", "bn1", "layer1"))}
    source = tmp_path / "partial.safetensors"
    save_file(partial, source)
    with pytest.raises(DlwatchdError) as info:
        WeightsStore(tmp_path / "store").import_file("resnet18", source)
    assert info.value.code is ErrorCode.SCHEMA
    assert f"only {len(partial)} of the encoder's {len(resnet18_state)}" in info.value.message


class NotATensor:
    pass


def test_a_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": NotATensor()}, source)
    with pytest.raises(DlwatchdError) as info:
        WeightsStore(tmp_path / "store").import_file("resnet18", source)
    assert info.value.code is ErrorCode.UNSAFE_MODEL


def test_bad_names_never_reach_the_filesystem(tmp_path: Path) -> None:
    store = WeightsStore(tmp_path / "store")
    for encoder, tag in (("../escape", "imagenet"), ("resnet18/x", "imagenet"), ("resnet18", "other")):
        with pytest.raises(DlwatchdError) as info:
            store.path_for(encoder, tag)
        assert info.value.code is ErrorCode.SCHEMA
        assert not store.available(encoder, tag)


def test_hand_placed_pth_is_found_listed_and_cleaned(tmp_path: Path, resnet18_state: dict) -> None:
    folder = tmp_path / "store" / "resnet18"
    folder.mkdir(parents=True)
    torch.save({"model": {**resnet18_state, "fc.weight": torch.zeros(2, 512)}}, folder / "imagenet.pth")
    store = WeightsStore(tmp_path / "store")
    assert store.available("resnet18")
    [entry] = store.entries()
    assert (entry["encoder"], entry["tag"], entry["sha256"]) == ("resnet18", "imagenet", None)
    assert_same_tensors(store.load("resnet18"), resnet18_state)


def test_resolve_finds_smp_weights_in_the_local_hub_cache(
    tmp_path: Path, hub_cache: Path, resnet18_state: dict, no_network: list
) -> None:
    settings = smp_encoders["resnet18"]["pretrained_settings"]["imagenet"]
    weights = tmp_path / "w.safetensors"
    save_file(resnet18_state, weights)
    store = WeightsStore(tmp_path / "store")
    assert store.resolve("resnet18") is None

    lay_out_hub_repo(hub_cache, settings["repo_id"], settings["revision"], {"model.safetensors": weights})

    found = store.resolve("resnet18")
    assert found == hub_cache / "models--smp-hub--resnet18.imagenet" / "snapshots" / settings["revision"] / (
        "model.safetensors"
    )
    assert_same_tensors(store.load("resnet18"), resnet18_state)
    assert not store.available("resnet18"), "available() reports the store only"
    assert store.resolve("resnet34") is None
    assert no_network == []


def test_resolve_prefers_the_store_over_the_hub_cache(tmp_path: Path, hub_cache: Path, resnet18_state: dict) -> None:
    settings = smp_encoders["resnet18"]["pretrained_settings"]["imagenet"]
    save_file(resnet18_state, tmp_path / "w.safetensors")
    lay_out_hub_repo(
        hub_cache, settings["repo_id"], settings["revision"], {"model.safetensors": tmp_path / "w.safetensors"}
    )
    store = WeightsStore(tmp_path / "store")
    store.import_file("resnet18", tmp_path / "w.safetensors")
    assert store.resolve("resnet18") == store.path_for("resnet18", "imagenet")


def test_resolve_finds_histology_weights_under_the_timm_hub_id(tmp_path: Path, hub_cache: Path) -> None:
    repo = lay_out_hub_repo(hub_cache, "1aurent/resnet50.lunit_swav", "f00d", {"pytorch_model.bin": b"x"})
    store = WeightsStore(tmp_path / "store")
    assert store.resolve("resnet50_lunit-swav") == repo / "snapshots" / "f00d" / "pytorch_model.bin"
    assert store.resolve("resnet50_lunit-bt") is None
    assert store.resolve("resnet50_lunit-swav", "imagenet") is None


def test_missing_weights_fail_at_once_without_network(tmp_path: Path, hub_cache: Path, no_network: list) -> None:
    store = WeightsStore(tmp_path / "store")
    with pytest.raises(DlwatchdError) as info:
        store.load("resnet34")
    error = info.value
    assert error.code is ErrorCode.WEIGHTS_UNAVAILABLE
    assert "resnet34" in error.message and "imagenet" in error.message
    assert (
        error.hint is not None and "dlwatchd weights import resnet34" in error.hint and "--tag imagenet" in error.hint
    )
    assert no_network == []
    assert missing_weights_error("resnet34", "imagenet").message == error.message


def test_the_store_answers_without_importing_torch(tmp_path: Path, resnet18_state: dict) -> None:
    source = tmp_path / "w.safetensors"
    save_file(resnet18_state, source)
    WeightsStore(tmp_path / "store").import_file("resnet18", source)
    script = (
        "import sys; from pathlib import Path; from dlwatchd.engine.weights import WeightsStore\n"
        f"store = WeightsStore(Path({str(tmp_path / 'store')!r}))\n"
        "print(store.available('resnet18'), store.available('resnet34'), len(store.entries()))\n"
        "print(sorted(m for m in ('torch', 'safetensors', 'huggingface_hub', 'segmentation_models_pytorch')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.splitlines() == ["True False 1", "[]"]
