"""Normalization against a literal numpy transcription of ENGINE.md §4.1, degenerate channels and dataset scope."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dlwatchd.engine.normalization import NormalizationConfig, Normalizer, fit_dataset_stats, summary_stats
from dlwatchd.errors import DlwatchdError, ErrorCode


def transcription(x: np.ndarray, strategy: str, per_channel: bool, p: float = 99.0, lo=0.0, hi=255.0) -> np.ndarray:
    """The §4.1 table written out with plain numpy, one statistic per channel or one over everything."""
    x = x.astype(np.float32)
    k = x.shape[2]
    out = np.empty_like(x)
    groups = [[c] for c in range(k)] if per_channel and k > 1 else [list(range(k))]
    for group in groups:
        s = x[..., group]
        if strategy == "percentile_99":
            a, b = np.percentile(s, 100 - p), np.percentile(s, p)
            out[..., group] = (np.clip(s, a, b) - a) / (b - a)
        elif strategy == "min_max":
            out[..., group] = (s - s.min()) / (s.max() - s.min())
        elif strategy == "z_score":
            z = np.clip((s - s.mean()) / s.std(), -5, 5)
            out[..., group] = (z + 5) / 10
        else:
            lows = np.broadcast_to(np.asarray(lo, dtype=np.float64), (k,))[group]
            highs = np.broadcast_to(np.asarray(hi, dtype=np.float64), (k,))[group]
            out[..., group] = (np.clip(s, lows, highs) - lows) / (highs - lows)
    return out


def raw_image(seed: int, k: int, h: int = 24, w: int = 20) -> np.ndarray:
    """16-bit-range raw values with per-channel offsets and a few outliers, so percentiles clip something."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(2.0, 300.0, size=(h, w, k)) + np.arange(k) * 1000.0
    x[rng.random((h, w, k)) < 0.02] *= 20
    return x.astype(np.float32)


@pytest.mark.parametrize("strategy", ["percentile_99", "min_max", "z_score", "fixed_range"])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_tile_scope_matches_the_formula_table(strategy: str, per_channel: bool, k: int) -> None:
    x = raw_image(k * 10 + per_channel, k)
    out, degenerate = Normalizer(NormalizationConfig(strategy=strategy, per_channel=per_channel)).apply(x)
    assert out.dtype == np.float32 and out.shape == x.shape and degenerate == 0
    np.testing.assert_allclose(out, transcription(x, strategy, per_channel), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [95.0, 99.9, 100.0])
def test_clip_percentile_is_honoured(p: float) -> None:
    x = raw_image(3, 3)
    out, _ = Normalizer(NormalizationConfig(clip_percentile=p)).apply(x)
    np.testing.assert_allclose(out, transcription(x, "percentile_99", True, p=p), rtol=1e-5, atol=1e-6)


def test_fixed_range_per_channel_bounds() -> None:
    x = raw_image(4, 3)
    config = NormalizationConfig(strategy="fixed_range", min=(0.0, 500.0, 1000.0), max=(2000.0, 3000.0, 9000.0))
    out, degenerate = Normalizer(config).apply(x)
    expected = transcription(x, "fixed_range", True, lo=[0.0, 500.0, 1000.0], hi=[2000.0, 3000.0, 9000.0])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert degenerate == 0
    with pytest.raises(DlwatchdError) as info:
        Normalizer(config).apply(raw_image(4, 2))
    assert info.value.code == ErrorCode.CHANNELS


def test_fixed_range_rejects_crossed_bounds() -> None:
    with pytest.raises(DlwatchdError) as info:
        NormalizationConfig(strategy="fixed_range", min=(0.0, 10.0), max=(255.0, 10.0))
    assert info.value.code == ErrorCode.SCHEMA and info.value.field == "input_config.normalization.max"


@pytest.mark.parametrize("strategy", ["percentile_99", "min_max", "z_score"])
def test_degenerate_channel_becomes_zero_and_is_counted(strategy: str) -> None:
    x = raw_image(5, 3)
    x[..., 1] = 255.0  # an all-white channel: hi == lo, σ == 0
    out, degenerate = Normalizer(NormalizationConfig(strategy=strategy)).apply(x)
    assert degenerate == 1
    assert np.all(out[..., 1] == 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):  # the transcription divides by zero on channel 1
        healthy = transcription(x, strategy, True)
    np.testing.assert_allclose(out[..., [0, 2]], healthy[..., [0, 2]], rtol=1e-5, atol=1e-6)


def test_non_finite_statistic_is_degenerate() -> None:
    x = raw_image(6, 2)
    x[0, 0, 0] = np.inf
    out, degenerate = Normalizer(NormalizationConfig(strategy="min_max")).apply(x)
    assert degenerate == 1 and np.all(out[..., 0] == 0.0) and np.isfinite(out).all()


def test_degenerate_joint_sample_zeroes_every_channel() -> None:
    x = np.full((8, 8, 3), 7.0, dtype=np.float32)
    out, degenerate = Normalizer(NormalizationConfig(strategy="z_score", per_channel=False)).apply(x)
    assert degenerate == 3 and np.all(out == 0.0)


def test_joint_statistics_are_really_joint() -> None:
    # Channel 0 spans [0, 1], channel 1 spans [0, 1000]: channel 0's statistics applied to channel 1 would
    # saturate it, a joint statistic leaves channel 0 tiny.
    rng = np.random.default_rng(7)
    x = np.stack([rng.random((16, 16)), rng.random((16, 16)) * 1000.0], axis=-1).astype(np.float32)
    x[0, 0] = (0.0, 0.0)
    x[0, 1] = (1.0, 1000.0)
    out, _ = Normalizer(NormalizationConfig(strategy="min_max", per_channel=False)).apply(x)
    assert out[..., 0].max() <= 1.0 / 1000.0 + 1e-7
    assert out[..., 1].max() == pytest.approx(1.0)
    assert 0.2 < out[..., 1].mean() < 0.8


def test_output_stays_in_unit_interval() -> None:
    images = [raw_image(seed, 3) for seed in range(3)]
    unseen = raw_image(99, 3) * 3.0 - 500.0  # outside everything the dataset statistics saw
    for strategy in ("percentile_99", "min_max", "z_score", "fixed_range"):
        for per_channel in (True, False):
            for scope in ("tile", "dataset"):
                config = NormalizationConfig(strategy=strategy, per_channel=per_channel, scope=scope)
                config = fit_dataset_stats(images, config)
                for x in (*images, unseen):
                    out, _ = Normalizer(config).apply(x)
                    assert out.dtype == np.float32
                    assert out.min() >= 0.0 and out.max() <= 1.0, (strategy, per_channel, scope)


@pytest.mark.parametrize("per_channel", [True, False])
def test_dataset_stats_equal_numpy_over_the_concatenation(per_channel: bool) -> None:
    images = [raw_image(seed, 3, h=10 + seed, w=12) for seed in range(4)]
    flat = np.concatenate([x.reshape(-1, 3) for x in images])
    samples = [flat[:, c] for c in range(3)] if per_channel else [flat.ravel()]

    def fit(strategy: str) -> tuple[dict, ...]:
        config = NormalizationConfig(strategy=strategy, per_channel=per_channel, scope="dataset")
        stats = fit_dataset_stats(iter(images), config).stats
        assert stats is not None and len(stats) == len(samples)
        return stats

    for entry, s in zip(fit("min_max"), samples, strict=True):
        assert entry == {"lo": float(s.min()), "hi": float(s.max())}
    for entry, s in zip(fit("z_score"), samples, strict=True):
        assert entry["mean"] == pytest.approx(s.astype(np.float64).mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(s.astype(np.float64).std(), rel=1e-12)
    # Fewer values than the sample limit: the percentiles are exact.
    for entry, s in zip(fit("percentile_99"), samples, strict=True):
        assert entry == {"lo": float(np.percentile(s, 1.0)), "hi": float(np.percentile(s, 99.0))}


def test_dataset_percentiles_from_a_bounded_sample_are_close_and_deterministic() -> None:
    images = [raw_image(seed, 2, h=64, w=64) for seed in range(6)]  # 24,576 values per channel
    config = NormalizationConfig(scope="dataset")
    first = fit_dataset_stats(images, config, sample_limit=4000, seed=1).stats
    assert first == fit_dataset_stats(images, config, sample_limit=4000, seed=1).stats
    assert first != fit_dataset_stats(images, config, sample_limit=4000, seed=2).stats
    flat = np.concatenate([x.reshape(-1, 2) for x in images])
    for c, entry in enumerate(first or ()):
        exact_lo, exact_hi = np.percentile(flat[:, c], [1.0, 99.0])
        assert entry["lo"] == pytest.approx(exact_lo, rel=0.1)
        assert entry["hi"] == pytest.approx(exact_hi, rel=0.1)


def test_dataset_scope_uses_the_stored_statistics_for_every_image() -> None:
    images = [raw_image(seed, 3) for seed in range(3)]
    config = fit_dataset_stats(images, NormalizationConfig(strategy="min_max", scope="dataset"))
    out, _ = Normalizer(config).apply(images[1])
    flat = np.concatenate([x.reshape(-1, 3) for x in images])
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    np.testing.assert_allclose(out, (images[1] - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, Normalizer(NormalizationConfig(strategy="min_max")).apply(images[1])[0])


def test_dataset_scope_without_statistics_is_refused() -> None:
    with pytest.raises(DlwatchdError) as info:
        Normalizer(NormalizationConfig(scope="dataset"))
    assert info.value.code == ErrorCode.SCHEMA
    config = fit_dataset_stats([raw_image(1, 3)], NormalizationConfig(scope="dataset"))
    with pytest.raises(DlwatchdError) as info:
        Normalizer(config).apply(raw_image(1, 2))
    assert info.value.code == ErrorCode.CHANNELS


@pytest.mark.parametrize(
    "config",
    [
        NormalizationConfig(),
        NormalizationConfig(strategy="z_score", per_channel=False, clip_percentile=97.5),
        NormalizationConfig(strategy="fixed_range", min=(0.0, 10.0, 20.0), max=4095.0),
        NormalizationConfig(strategy="percentile_99", scope="dataset", clip_percentile=99.5),
        NormalizationConfig(strategy="z_score", scope="dataset", per_channel=False),
        NormalizationConfig(strategy="min_max", scope="dataset"),
    ],
)
def test_metadata_round_trip_gives_identical_outputs(config: NormalizationConfig) -> None:
    images = [raw_image(seed, 3) for seed in range(3)]
    images[0][..., 2] = 5.0
    images[1][..., 2] = 5.0
    images[2][..., 2] = 5.0  # degenerate under dataset scope too
    config = fit_dataset_stats(images, config)
    stored = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert list(stored) == ["strategy", "per_channel", "clip_percentile", "min", "max", "scope", "stats"]
    again = NormalizationConfig.from_dict(stored)
    assert again.to_dict() == stored
    probe = raw_image(42, 3)
    a, count_a = Normalizer(config).apply(probe)
    b, count_b = Normalizer(again).apply(probe)
    assert np.array_equal(a, b) and count_a == count_b


def test_from_dict_reads_request_shapes() -> None:
    config = NormalizationConfig.from_dict(
        {"strategy": "FIXED_RANGE", "per_channel": False, "min": [0, 1], "max": [255, 256], "scope": None}
    )
    assert config.strategy == "fixed_range" and config.min == (0.0, 1.0) and config.max == (255.0, 256.0)
    assert config.scope == "tile" and config.per_channel is False
    assert NormalizationConfig.from_dict({}) == NormalizationConfig()
    for bad in ({"strategy": "imagenet"}, {"clip_percentile": 40}, {"scope": "image"}, {"per_channel": "yes"}):
        with pytest.raises(DlwatchdError) as info:
            NormalizationConfig.from_dict(bad)
        assert info.value.code == ErrorCode.SCHEMA


def test_summary_stats_per_channel() -> None:
    images = [raw_image(seed, 3) for seed in range(3)]
    flat = np.concatenate([x.reshape(-1, 3) for x in images])
    summary = summary_stats(iter(images))
    assert len(summary) == 3
    for c, entry in enumerate(summary):
        assert list(entry) == ["min", "max", "mean", "std", "p1", "p99"]
        assert entry["min"] == float(flat[:, c].min()) and entry["max"] == float(flat[:, c].max())
        assert entry["mean"] == pytest.approx(flat[:, c].astype(np.float64).mean(), rel=1e-12)
        assert entry["std"] == pytest.approx(flat[:, c].astype(np.float64).std(), rel=1e-12)
        assert entry["p1"] == float(np.percentile(flat[:, c], 1.0))
        assert entry["p99"] == float(np.percentile(flat[:, c], 99.0))


def test_statistics_need_images_with_one_channel_count() -> None:
    with pytest.raises(DlwatchdError) as info:
        summary_stats([])
    assert info.value.code == ErrorCode.EMPTY_DATASET
    with pytest.raises(DlwatchdError) as info:
        fit_dataset_stats([raw_image(1, 3), raw_image(2, 2)], NormalizationConfig(scope="dataset"))
    assert info.value.code == ErrorCode.CHANNELS


@pytest.mark.parametrize("high", [1, 255, 4095, 65535])
@pytest.mark.parametrize("percentile", [99.0, 99.5, 75.3, 100.0])
def test_the_histogram_percentiles_of_integer_pixels_equal_numpys(high: int, percentile: float) -> None:
    from dlwatchd.engine.normalization import _integer_percentiles

    rng = np.random.default_rng(high)
    for size in (1, 2, 7, 1000, 4097):
        sample = rng.integers(0, high + 1, size).astype(np.float32)
        expected = (float(np.percentile(sample, 100 - percentile)), float(np.percentile(sample, percentile)))
        assert _integer_percentiles(sample, (100 - percentile, percentile)) == expected


def test_non_integer_or_out_of_range_pixels_take_numpys_own_path() -> None:
    from dlwatchd.engine.normalization import _integer_percentiles

    assert _integer_percentiles(np.array([0.5, 1.0], np.float32), (1.0, 99.0)) is None
    assert _integer_percentiles(np.array([-1.0, 3.0], np.float32), (1.0, 99.0)) is None
    assert _integer_percentiles(np.array([70000.0], np.float32), (1.0, 99.0)) is None
    assert _integer_percentiles(np.array([1.0, 2.0]), (1.0, 99.0)) is None  # float64 data


INTEGER_IMAGES = {
    "uint8 uniform": np.random.default_rng(1).integers(0, 256, (61, 47, 3), dtype=np.uint8),
    "uint8 skewed": np.random.default_rng(2).gamma(2.0, 20.0, (40, 33, 3)).clip(0, 255).astype(np.uint8),
    "uint16 12-bit, 5 channels": np.random.default_rng(3).integers(0, 4096, (30, 20, 5), dtype=np.uint16),
    "uint16 one value": np.full((9, 8, 2), 7, dtype=np.uint16),
}
ROAD_CONFIGS = [
    NormalizationConfig(strategy=strategy, per_channel=per_channel)
    for strategy in ("percentile_99", "min_max", "z_score")
    for per_channel in (True, False)
] + [
    NormalizationConfig(strategy="fixed_range", min=10.0, max=200.0),
    NormalizationConfig(strategy="percentile_99", scope="dataset", stats=[{"lo": 3.0, "hi": 180.0}] * 5),
]


@pytest.mark.parametrize("name", sorted(INTEGER_IMAGES))
@pytest.mark.parametrize("config", ROAD_CONFIGS, ids=lambda c: f"{c.strategy}-{c.scope}-{c.per_channel}")
def test_integer_pixels_normalize_to_the_same_bits_as_their_float_values(
    name: str, config: NormalizationConfig
) -> None:
    image = INTEGER_IMAGES[name]
    if config.scope == "dataset":
        config = NormalizationConfig(**{**config.to_dict(), "stats": config.stats[: image.shape[2]]})
    normalizer = Normalizer(config)
    expected, expected_degenerate = normalizer.apply(image.astype(np.float32))
    hwc, degenerate = normalizer.apply(image)
    chw, degenerate_first = normalizer.apply(image, channels_first=True)
    assert hwc.dtype == chw.dtype == np.float32
    assert np.array_equal(hwc, expected) and np.array_equal(chw, expected.transpose(2, 0, 1))
    assert chw.flags.c_contiguous
    assert degenerate == degenerate_first == expected_degenerate
