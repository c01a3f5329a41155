"""Raw pixels to [0, 1]: the one normalization shared by training and inference (ENGINE.md section 4); numpy only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dlwatchd.errors import DlwatchdError, ErrorCode

STRATEGIES = ("percentile_99", "min_max", "z_score", "fixed_range")
SCOPES = ("tile", "dataset")

_FIELD = "input_config.normalization"
_Z_CLIP = 5.0
# Which statistics a strategy stores under dataset scope; fixed_range has fixed bounds instead.
_STAT_KEYS = {"percentile_99": ("lo", "hi"), "min_max": ("lo", "hi"), "z_score": ("mean", "std")}
# Pixel types normalized through a lookup table (io.read_image hands them over as they are on request).
INTEGER_PIXELS = (np.dtype(np.uint8), np.dtype(np.uint16))

Bounds = float | tuple[float, ...]


def _schema_error(message: str, key: str) -> DlwatchdError:
    return DlwatchdError(ErrorCode.SCHEMA, message, field=f"{_FIELD}.{key}")


@dataclass(frozen=True)
class NormalizationConfig:
    """How raw pixels map to [0, 1]; exactly what model metadata stores (section 4.4).

    Raises DlwatchdError(E_SCHEMA) for an unknown strategy or scope, a clip percentile outside (50, 100],
    non-finite or crossed fixed_range bounds, or dataset statistics lacking the keys the strategy needs.
    """

    strategy: str = "percentile_99"
    per_channel: bool = True
    clip_percentile: float = 99.0
    min: Bounds = 0.0
    max: Bounds = 255.0
    scope: str = "tile"
    # Dataset scope: per channel {"lo","hi"} or {"mean","std"}, one entry when joint; unused under tile scope.
    stats: tuple[dict, ...] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            valid = ", ".join(STRATEGIES)
            raise _schema_error(f"unknown normalization strategy {self.strategy!r}; valid: {valid}", "strategy")
        if self.scope not in SCOPES:
            raise _schema_error(f"unknown normalization scope {self.scope!r}; valid: {', '.join(SCOPES)}", "scope")
        if not (50.0 < self.clip_percentile <= 100.0):
            raise _schema_error(f"clip_percentile must lie in (50, 100], got {self.clip_percentile}", "clip_percentile")
        if self.strategy == "fixed_range":
            self._check_bounds()
        if self.stats is not None and self.strategy in _STAT_KEYS:
            wanted = _STAT_KEYS[self.strategy]
            for index, entry in enumerate(self.stats):
                if not isinstance(entry, dict) or any(key not in entry for key in wanted):
                    raise _schema_error(f"stats[{index}] must hold {' and '.join(wanted)} for {self.strategy}", "stats")

    def _check_bounds(self) -> None:
        lows, highs = _as_tuple(self.min), _as_tuple(self.max)
        if len(lows) != len(highs) and 1 not in (len(lows), len(highs)):
            raise _schema_error(f"min has {len(lows)} values but max has {len(highs)}", "max")
        width = max(len(lows), len(highs))
        for channel in range(width):
            lo, hi = lows[min(channel, len(lows) - 1)], highs[min(channel, len(highs) - 1)]
            if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
                raise _schema_error(f"fixed_range needs finite max > min (channel {channel}: {lo}, {hi})", "max")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationConfig:
        """Build from a request or metadata `normalization` object; absent or null keys take the defaults.

        Strategy and scope are matched case-insensitively (the client schema stores them upper-cased); a null
        statistic reads as NaN, so a channel stored as degenerate stays degenerate. Unknown keys are ignored.
        """
        values: dict[str, Any] = {}
        if data.get("strategy") is not None:
            values["strategy"] = str(data["strategy"]).lower()
        if data.get("scope") is not None:
            values["scope"] = str(data["scope"]).lower()
        if data.get("per_channel") is not None:
            if not isinstance(data["per_channel"], bool):
                raise _schema_error(f"per_channel must be true or false, got {data['per_channel']!r}", "per_channel")
            values["per_channel"] = data["per_channel"]
        if data.get("clip_percentile") is not None:
            values["clip_percentile"] = _number(data["clip_percentile"], "clip_percentile")
        for key in ("min", "max"):
            if data.get(key) is not None:
                raw = data[key]
                values[key] = (
                    tuple(_number(v, key) for v in raw) if isinstance(raw, list | tuple) else _number(raw, key)
                )
        if data.get("stats") is not None:
            if not isinstance(data["stats"], list | tuple):
                raise _schema_error("stats must be a list of per-channel objects", "stats")
            values["stats"] = tuple(_stat_entry(entry, index) for index, entry in enumerate(data["stats"]))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The metadata form (section 4.4): JSON-safe, non-finite statistics as null; round-trips through from_dict."""
        return {
            "strategy": self.strategy,
            "per_channel": self.per_channel,
            "clip_percentile": float(self.clip_percentile),
            "min": _bounds_json(self.min),
            "max": _bounds_json(self.max),
            "scope": self.scope,
            "stats": None
            if self.stats is None
            else [{key: _json_float(value) for key, value in entry.items()} for entry in self.stats],
        }


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _schema_error(f"{key} must be a number, got {value!r}", key)
    return float(value)


def _stat_entry(entry: Any, index: int) -> dict[str, float]:
    if not isinstance(entry, dict):
        raise _schema_error(f"stats[{index}] must be an object, got {entry!r}", "stats")
    return {str(key): math.nan if value is None else _number(value, "stats") for key, value in entry.items()}


def _as_tuple(bounds: Bounds) -> tuple[float, ...]:
    return tuple(float(v) for v in bounds) if isinstance(bounds, tuple | list) else (float(bounds),)


def _bounds_json(bounds: Bounds) -> float | list[float]:
    return [float(v) for v in bounds] if isinstance(bounds, tuple | list) else float(bounds)


def _json_float(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _degenerate(lo: float, hi: float) -> bool:
    return not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo


class Normalizer:
    """Applies one NormalizationConfig to H×W×K images; training and inference both go through `apply`.

    Raises DlwatchdError(E_SCHEMA) at construction when dataset scope has no stored statistics.
    """

    def __init__(self, config: NormalizationConfig) -> None:
        if config.scope == "dataset" and config.strategy in _STAT_KEYS and config.stats is None:
            raise DlwatchdError(
                ErrorCode.SCHEMA,
                "dataset-scope normalization has no stored statistics",
                hint="fit them on the training images with fit_dataset_stats, or use scope 'tile'",
                field=f"{_FIELD}.stats",
            )
        self.config = config

    def apply(self, image: np.ndarray, *, channels_first: bool = False) -> tuple[np.ndarray, int]:
        """Normalize raw H×W×K pixels into a new float32 array in [0, 1], H×W×K or (`channels_first`) K×H×W.

        Returns (array, degenerate channel count); a degenerate channel (or every channel, for a degenerate joint
        sample) is set to 0.0. Raises DlwatchdError(E_CHANNELS) when stored statistics or per-channel bounds do
        not match K. Non-finite pixels are the caller's to reject: with fixed bounds they stay non-finite.

        uint8 and uint16 pixels take a faster road with the same result to the bit: the statistics come from
        their histogram, and each channel maps through a lookup table holding the float arithmetic's result for
        every value that occurs.
        """
        integers = image.dtype in INTEGER_PIXELS
        x = image if integers else np.asarray(image, dtype=np.float32)
        if x.ndim != 3:
            raise DlwatchdError(ErrorCode.INTERNAL, f"normalize expects an H×W×K image, got shape {x.shape}")
        height, width, channels = x.shape
        out = np.empty((channels, height, width) if channels_first else x.shape, dtype=np.float32)
        degenerate = 0
        for group, stat in self._groups(x):
            for c in group:
                target = out[c] if channels_first else out[..., c]
                if integers:
                    indices = x[..., c]
                    table = self._transform(np.arange(int(indices.max()) + 1, dtype=np.float32), stat)
                    plane = None if table is None else table[indices]
                else:
                    plane = self._transform(x[..., c], stat)
                if plane is None:
                    target[...] = 0.0
                    degenerate += 1
                else:
                    target[...] = plane
        return out, degenerate

    def _groups(self, x: np.ndarray) -> Iterator[tuple[range, tuple[float, float]]]:
        """Yield (channels, statistic) pairs: one per channel, or one joint pair covering every channel."""
        cfg, channels = self.config, x.shape[2]
        if cfg.strategy == "fixed_range":
            lows, highs = _per_channel(cfg.min, channels, "min"), _per_channel(cfg.max, channels, "max")
            for c in range(channels):
                yield range(c, c + 1), (lows[c], highs[c])
            return
        joint = not cfg.per_channel or channels == 1
        if cfg.scope == "dataset":
            stats = cfg.stats or ()
            wanted = 1 if joint else channels
            if len(stats) != wanted:
                raise DlwatchdError(
                    ErrorCode.CHANNELS,
                    f"stored normalization statistics cover {len(stats)} channel(s) but the image needs {wanted}",
                    field=f"{_FIELD}.stats",
                )
            lo_key, hi_key = _STAT_KEYS[cfg.strategy]
            pairs = [(float(entry[lo_key]), float(entry[hi_key])) for entry in stats]
        else:
            samples = [x] if joint else [x[..., c] for c in range(channels)]
            pairs = [self._tile_stat(sample) for sample in samples]
        if joint:
            yield range(channels), pairs[0]
        else:
            for c in range(channels):
                yield range(c, c + 1), pairs[c]

    def _tile_stat(self, sample: np.ndarray) -> tuple[float, float]:
        strategy = self.config.strategy
        if sample.dtype in INTEGER_PIXELS and strategy != "percentile_99":
            sample = sample.astype(np.float32)  # exact; the statistics below are then those of the float road
        if strategy == "percentile_99":
            p = self.config.clip_percentile
            fast = _integer_percentiles(sample, (100.0 - p, p))
            if fast is not None:
                return fast
            # One scalar q per call, as the reference: a list of q would promote float32 data to float64 results.
            return float(np.percentile(sample, 100.0 - p)), float(np.percentile(sample, p))
        if strategy == "min_max":
            return float(sample.min()), float(sample.max())
        return float(sample.mean(dtype=np.float64)), float(sample.std(dtype=np.float64))

    def _transform(self, plane: np.ndarray, stat: tuple[float, float]) -> np.ndarray | None:
        # float64 arithmetic keeps (x - lo)/(hi - lo) inside [0, 1] exactly; the float32 cast cannot leave it.
        values = plane.astype(np.float64)
        if self.config.strategy == "z_score":
            mean, std = stat
            if not (math.isfinite(mean) and math.isfinite(std)) or std <= 0.0:
                return None
            z = np.clip((values - mean) / std, -_Z_CLIP, _Z_CLIP)
            return ((z + _Z_CLIP) / (2 * _Z_CLIP)).astype(np.float32)
        lo, hi = stat
        if _degenerate(lo, hi):
            return None
        # Clipping is a no-op for tile-scope min_max and keeps unseen tiles in range under dataset scope.
        return ((np.clip(values, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _integer_percentiles(sample: np.ndarray, percents: tuple[float, float]) -> tuple[float, float] | None:
    """np.percentile's two values (linear method, as for float32 input), from a histogram, for 8/16-bit pixels.

    Decoded 8/16-bit images hold whole numbers in 0..65535; their order statistics come from one bincount in a
    single pass, where np.percentile partitions the whole plane once per percentile. The interpolation repeats
    numpy's own steps on float32 values, so the result is the same number. None for any other data.
    """
    if sample.size == 0:
        return None
    if sample.dtype in INTEGER_PIXELS:
        values, high = sample, int(sample.max())
    elif sample.dtype == np.float32:
        low, top = float(sample.min()), float(sample.max())
        if not (low >= 0.0 and top <= 65535.0):
            return None
        values, high = sample.astype(np.uint16), int(top)
        if not np.array_equal(values, sample):
            return None
    else:
        return None
    cumulative = np.cumsum(np.bincount(values.ravel(), minlength=int(high) + 1))
    count = sample.size

    def rank(index: int) -> np.float32:  # the index-th smallest value (0-based)
        return np.float32(np.searchsorted(cumulative, index, side="right"))

    results = []
    for percent in percents:
        virtual = (count - 1) * (percent / 100.0)
        below = min(max(math.floor(virtual), 0), count - 1)
        a, b = rank(below), rank(min(below + 1, count - 1))
        gamma = virtual - below
        difference = b - a
        results.append(float(b - difference * (1 - gamma) if gamma >= 0.5 else a + difference * gamma))
    return results[0], results[1]


def _per_channel(bounds: Bounds, channels: int, key: str) -> list[float]:
    values = _as_tuple(bounds)
    if len(values) == 1:
        return list(values) * channels
    if len(values) != channels:
        raise DlwatchdError(
            ErrorCode.CHANNELS,
            f"fixed_range {key} has {len(values)} values but the image has {channels} channels",
            field=f"{_FIELD}.{key}",
        )
    return list(values)


class _Accumulator:
    """Streaming statistics of m columns: exact min/max/mean/std (float64, Chan's merge) and a uniform sample.

    The sample keeps the rows with the smallest random keys (bottom-k), which is a uniform sample without
    replacement of at most `limit` rows, in one pass over an iterable of unknown length; it holds every row,
    hence exact percentiles, while fewer than `limit` were seen.
    """

    def __init__(self, columns: int, limit: int, keep_sample: bool, seed: int) -> None:
        if limit < 1:
            raise DlwatchdError(ErrorCode.INTERNAL, f"sample_limit must be at least 1, got {limit}")
        self.columns, self.limit, self.keep_sample = columns, limit, keep_sample
        self.count = 0
        self.mean = np.zeros(columns)
        self.m2 = np.zeros(columns)
        self.min = np.full(columns, np.inf)
        self.max = np.full(columns, -np.inf)
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0, dtype=np.float32)
        self._values = np.empty((columns, 0), dtype=np.float32)
        self._threshold = np.float32(2.0)  # no key reaches it until the sample is full

    def add(self, columns_by_rows: np.ndarray) -> None:
        """Add a float32 array shaped (m, n): n new rows, one value per column."""
        n = columns_by_rows.shape[1]
        if n == 0:
            return
        for j, values in enumerate(columns_by_rows):
            v = values.astype(np.float64)
            mean = v.mean()
            m2 = float(np.square(v - mean).sum())
            delta = mean - self.mean[j]
            total = self.count + n
            self.mean[j] += delta * n / total
            self.m2[j] += m2 + delta * delta * self.count * n / total
            # np.minimum, unlike min(), lets a NaN through so the statistic reads as degenerate.
            self.min[j] = np.minimum(self.min[j], values.min())
            self.max[j] = np.maximum(self.max[j], values.max())
        self.count += n
        if self.keep_sample:
            self._sample(columns_by_rows)

    def _sample(self, columns_by_rows: np.ndarray) -> None:
        keys = self._rng.random((columns_by_rows.shape[1],), dtype=np.float32)
        chosen = keys < self._threshold
        self._keys = np.concatenate([self._keys, keys[chosen]])
        self._values = np.concatenate([self._values, columns_by_rows[:, chosen]], axis=1)
        # Compacting only past 1.5× the limit keeps the argpartition cost amortised over many images.
        if self._keys.size > self.limit + self.limit // 2:
            self._compact()

    def _compact(self) -> None:
        if self._keys.size > self.limit:
            keep = np.argpartition(self._keys, self.limit - 1)[: self.limit]
            self._keys, self._values = self._keys[keep], self._values[:, keep]
        if self._keys.size >= self.limit:
            self._threshold = self._keys.max()

    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / self.count)

    def percentiles(self, q: list[float]) -> np.ndarray:
        """Percentiles per column from the sample, shaped (m, len(q)); numpy's default linear interpolation."""
        self._compact()
        return np.array([[np.percentile(column, one) for one in q] for column in self._values], dtype=np.float64)


def _accumulate(images: Iterable[np.ndarray], joint: bool, limit: int, keep_sample: bool, seed: int) -> _Accumulator:
    accumulator: _Accumulator | None = None
    channels = 0
    for index, image in enumerate(images):
        x = np.asarray(image, dtype=np.float32)
        if x.ndim != 3:
            raise DlwatchdError(ErrorCode.INTERNAL, f"statistics expect H×W×K images; image {index} is {x.shape}")
        if accumulator is None:
            channels = x.shape[2]
            accumulator = _Accumulator(1 if joint else channels, limit, keep_sample, seed)
        elif x.shape[2] != channels:
            raise DlwatchdError(
                ErrorCode.CHANNELS, f"image {index} has {x.shape[2]} channels, the first image had {channels}"
            )
        accumulator.add(x.reshape(1, -1) if joint else x.reshape(-1, channels).T)
    if accumulator is None:
        raise DlwatchdError(ErrorCode.EMPTY_DATASET, "no training images to compute normalization statistics from")
    return accumulator


def fit_dataset_stats(
    images: Iterable[np.ndarray],
    config: NormalizationConfig,
    *,
    sample_limit: int = 1_000_000,
    seed: int = 0,
) -> NormalizationConfig:
    """Compute dataset-scope statistics (section 4.3) over raw H×W×K images in one pass; return config with `stats`.

    min/max and mean/std are exact; percentiles come from a deterministic (seeded) uniform sample of at most
    `sample_limit` values per channel, exact when fewer. Joint (one entry) when per_channel is false.
    fixed_range needs no statistics and returns the config unchanged without reading the images.
    Raises DlwatchdError(E_EMPTY_DATASET) for no images and (E_CHANNELS) for differing channel counts.
    """
    if config.strategy not in _STAT_KEYS:
        return config
    acc = _accumulate(images, not config.per_channel, sample_limit, config.strategy == "percentile_99", seed)
    if config.strategy == "percentile_99":
        p = config.clip_percentile
        stats = [{"lo": float(lo), "hi": float(hi)} for lo, hi in acc.percentiles([100.0 - p, p])]
    elif config.strategy == "min_max":
        stats = [{"lo": float(lo), "hi": float(hi)} for lo, hi in zip(acc.min, acc.max, strict=True)]
    else:
        stats = [{"mean": float(mean), "std": float(std)} for mean, std in zip(acc.mean, acc.std(), strict=True)]
    return replace(config, stats=tuple(stats))


def summary_stats(images: Iterable[np.ndarray], *, sample_limit: int = 1_000_000, seed: int = 0) -> list[dict]:
    """Per-channel min, max, mean, std, p1, p99 of raw images: `normalization_stats` for drift checks only.

    Same accumulation as fit_dataset_stats (exact moments, sampled percentiles); non-finite values become None.
    Raises DlwatchdError(E_EMPTY_DATASET) for no images and (E_CHANNELS) for differing channel counts.
    """
    acc = _accumulate(images, False, sample_limit, True, seed)
    percentiles = acc.percentiles([1.0, 99.0])
    std = acc.std()
    return [
        {
            "min": _json_float(float(acc.min[c])),
            "max": _json_float(float(acc.max[c])),
            "mean": _json_float(float(acc.mean[c])),
            "std": _json_float(float(std[c])),
            "p1": _json_float(float(percentiles[c, 0])),
            "p99": _json_float(float(percentiles[c, 1])),
        }
        for c in range(acc.columns)
    ]
