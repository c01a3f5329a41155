"""One image and mask reader for training and inference (ENGINE §3.3, §3.4, §12.2).

The format is decided by the file's first bytes, never by its extension: TIFF goes to tifffile (16-bit RGB,
float and many-channel files, which Pillow cannot read), PNG and JPEG go to Pillow. Every size check happens
on the header, before any pixel is decoded. Images come back H×W×K float32 in raw file units (no /255).

`max_pixels` caps the decoded samples, height × width × channels: that product, not H×W alone, is what the
float32 result costs in memory.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import BinaryIO

import numpy as np

from dlwatchd.engine.normalization import INTEGER_PIXELS
from dlwatchd.errors import DlwatchdError, ErrorCode
from dlwatchd.spool.paths import open_regular_file

DEFAULT_MAX_PIXELS = 2**28

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# §3.3's list, plus three that convert to float32 exactly (bilevel TIFFs decode as bool).
_TIFF_DTYPES = {"uint8", "uint16", "int16", "uint32", "int32", "float32", "float64", "bool", "int8", "float16"}
_PILLOW_DEPTH = {"1": 8, "L": 8, "LA": 8, "P": 8, "PA": 8, "RGB": 8, "RGBA": 8, "I": 32, "F": 32}
# The third axis of a TIFF whose axes string is unusable is taken as channels only up to this length.
_MAX_GUESSED_CHANNELS = 64
# Pillow's bomb check reads a module global; the lock keeps concurrent reads in this process from
# restoring each other's value out of order.
_PILLOW_LIMIT_LOCK = threading.Lock()


@dataclass
class _Decoded:
    pixels: np.ndarray  # H×W×K in the file's own dtype
    bit_depth: int


def _read_error(name: str, reason: object) -> DlwatchdError:
    text = str(reason).strip() or type(reason).__name__
    return DlwatchdError(ErrorCode.IMAGE_READ, f"The image {name} cannot be decoded: {text}.")


def _check_size(name: str, shape: tuple[int, ...], max_pixels: int) -> None:
    values = prod(int(n) for n in shape)
    if values > max_pixels:
        dims = " × ".join(str(n) for n in shape)
        raise DlwatchdError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"The image {name} is {dims} ({values} values), above the limit of {max_pixels}.",
            hint="Export smaller tiles.",
        )


def _sniff(head: bytes) -> str | None:
    if head.startswith(_TIFF_MAGIC):
        return "TIFF"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head.startswith(_JPEG_MAGIC):
        return "JPEG"
    return None


def _arrange_axes(data: np.ndarray, axes: str, name: str, expected_channels: int | None) -> np.ndarray:
    """H×W×K view of a TIFF series by §3.3: drop length-1 axes but Y/X, then find the channel axis."""
    if data.ndim < 2:
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"The image {name} is not two-dimensional (shape {data.shape}).")
    usable = len(axes) == data.ndim and axes.count("Y") == 1 and axes.count("X") == 1
    if usable:
        keep = [i for i, n in enumerate(data.shape) if n != 1 or axes[i] in "YX"]
    else:
        keep = [i for i, n in enumerate(data.shape) if n != 1]
        if len(keep) < 2:
            # An image one pixel high or wide still has two spatial axes: keep the last length-1 axes.
            ones = [i for i in range(data.ndim) if i not in keep]
            keep = sorted(keep + ones[len(ones) - (2 - len(keep)) :])
    kept = [axes[i] for i in keep] if usable else []
    data = data.reshape([data.shape[i] for i in keep])
    described = f"shape {tuple(data.shape)}" + (f", axes {''.join(kept)}" if kept else "")
    if data.ndim == 2:
        return (data.T if kept == ["X", "Y"] else data)[:, :, None]
    if data.ndim != 3:
        raise DlwatchdError(
            ErrorCode.IMAGE_READ,
            f"The image {name} has {data.ndim} non-trivial axes ({described}); expected Y, X and one channel axis.",
            hint="Export one 2-D plane (single z-slice and time point) per tile.",
        )
    if usable:
        channel = next(i for i, a in enumerate(kept) if a not in "YX")
        return data.transpose(kept.index("Y"), kept.index("X"), channel)
    matches = [i for i, n in enumerate(data.shape) if expected_channels is not None and n == expected_channels]
    if len(matches) == 1:
        channel = matches[0]
    else:
        channel = int(np.argmin(data.shape))
        others = [n for i, n in enumerate(data.shape) if i != channel]
        if not (data.shape[channel] <= _MAX_GUESSED_CHANNELS and all(data.shape[channel] < n for n in others)):
            raise DlwatchdError(
                ErrorCode.IMAGE_READ,
                f"The image {name} does not say which axis holds its channels ({described}).",
                hint="Save the TIFF with axes metadata (for example axes='CYX' or 'YXS').",
            )
    spatial = [i for i in range(3) if i != channel]
    return data.transpose(spatial[0], spatial[1], channel)


def _decode_tiff(fh: BinaryIO, name: str, max_pixels: int, expected_channels: int | None) -> _Decoded:
    import tifffile

    try:
        # A name keeps tifffile from using the fd number as one; _multifile=False stops OME-XML in an untrusted
        # file from making tifffile open other files by name.
        with tifffile.TiffFile(fh, name=os.path.basename(name), _multifile=False) as tif:
            if not tif.series:
                raise ValueError("the file holds no image")
            series = tif.series[0]  # level 0 of a pyramid is the series itself
            shape = tuple(int(n) for n in series.shape)
            _check_size(name, shape, max_pixels)
            dtype = np.dtype(series.dtype) if series.dtype is not None else None
            if dtype is None or dtype.name not in _TIFF_DTYPES:
                raise ValueError(f"sample type {dtype} is not supported")
            data = series.asarray()
            axes = str(series.axes)
    except DlwatchdError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files; all mean "cannot read"
        raise _read_error(name, exc) from None
    depth = 8 if dtype.kind == "b" else dtype.itemsize * 8
    return _Decoded(_arrange_axes(np.asarray(data), axes, name, expected_channels), depth)


@contextmanager
def _pillow_unlimited() -> Iterator[None]:
    """Switch off Pillow's global bomb check for one `Image.open`, then restore it for other code.

    `Image.open` reads only the header; `_check_size` runs right after it, before any pixel is decoded, with
    this reader's limit and a message naming the size. Pillow's own default (about 179 M pixels, an error
    only above twice its global) would otherwise refuse images `max_pixels` allows, with another message.
    """
    from PIL import Image

    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode_pillow(fh: BinaryIO, name: str, fmt: str, max_pixels: int, palette_indices: bool) -> _Decoded:
    from PIL import Image

    try:
        with _pillow_unlimited():
            image = Image.open(fh, formats=[fmt])
        with image:
            width, height = image.size
            mode = image.mode
            # Palette images may become RGBA below; count the channels they will have.
            _check_size(name, (height, width, 4 if mode in ("P", "PA") else len(image.getbands())), max_pixels)
            if mode.startswith("I;16"):
                depth = 16
            elif mode in _PILLOW_DEPTH:
                depth = _PILLOW_DEPTH[mode]
            else:
                raise ValueError(f"colour mode {mode} is not supported")
            if mode in ("P", "PA") and not palette_indices:
                # Palette images are colours to a network; masks keep the indices (the class numbers).
                rgba = mode == "PA" or "transparency" in image.info
                pixels = np.asarray(image.convert("RGBA" if rgba else "RGB"))
            else:
                pixels = np.asarray(image)
    except DlwatchdError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        raise _read_error(name, exc) from None
    return _Decoded(pixels if pixels.ndim == 3 else pixels[:, :, None], depth)


def _decode(
    fh: BinaryIO, name: str, max_pixels: int, expected_channels: int | None = None, palette_indices: bool = False
) -> _Decoded:
    head = fh.read(16)
    fh.seek(0)
    fmt = _sniff(head)
    if fmt is None:
        raise DlwatchdError(
            ErrorCode.IMAGE_READ,
            f"The image {name} is not a TIFF, PNG or JPEG file (its content has none of their signatures).",
        )
    if fmt == "TIFF":
        return _decode_tiff(fh, name, max_pixels, expected_channels)
    return _decode_pillow(fh, name, fmt, max_pixels, palette_indices)


def _to_float(decoded: _Decoded, name: str, keep_integers: bool = False) -> np.ndarray:
    if keep_integers and decoded.pixels.dtype in INTEGER_PIXELS:
        return decoded.pixels
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, reported just below
        pixels = np.array(decoded.pixels, dtype=np.float32)  # always a fresh, writable, C-ordered copy
    if decoded.pixels.dtype.kind == "f":
        # Checked after the cast: float64 values beyond float32's range become inf too.
        bad = np.count_nonzero(~np.isfinite(pixels))
        if bad:
            raise DlwatchdError(
                ErrorCode.NONFINITE_INPUT,
                f"The image {name} holds {bad} non-finite value(s) (NaN or infinity).",
                hint="Replace NaN/infinite pixels before exporting.",
            )
    return pixels


def _read_file(path: Path, max_pixels: int, expected_channels: int | None, palette_indices: bool) -> _Decoded:
    fd = open_regular_file(path)
    with os.fdopen(fd, "rb") as fh:
        try:
            return _decode(fh, str(path), max_pixels, expected_channels, palette_indices)
        except OSError as exc:
            raise _read_error(str(path), exc) from None


def read_image_and_depth(
    path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, expected_channels: int | None = None
) -> tuple[np.ndarray, int]:
    """`read_image` plus the file's bits per sample (8, 16, 32 or 64), for the bit-depth warning."""
    decoded = _read_file(path, max_pixels, expected_channels, palette_indices=False)
    return _to_float(decoded, str(path)), decoded.bit_depth


def read_image(
    path: Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expected_channels: int | None = None,
    keep_integers: bool = False,
) -> np.ndarray:
    """Decode an image file into a writable H×W×K float32 array in raw units.

    With `keep_integers`, 8- and 16-bit pixels come back as uint8/uint16 instead (not copied, so possibly
    read-only), for Normalizer.apply to map through a lookup table. The file is opened with
    `open_regular_file` (no final symlink). `expected_channels` only breaks ties when a TIFF's axes string
    is unusable (§3.3). Raises E_IMAGE_TOO_LARGE (header over `max_pixels`, before decoding), E_IMAGE_READ
    (unknown signature, damaged file, unsupported type), E_NONFINITE_INPUT.
    """
    decoded = _read_file(path, max_pixels, expected_channels, palette_indices=False)
    return _to_float(decoded, str(path), keep_integers)


def decode_image_bytes(
    data: bytes,
    *,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expected_channels: int | None = None,
    keep_integers: bool = False,
) -> np.ndarray:
    """`read_image` for bytes already in memory; `name` is used in error messages."""
    return _to_float(_decode(io.BytesIO(data), name, max_pixels, expected_channels), name, keep_integers)


def read_data_url(
    url: str,
    *,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    expected_channels: int | None = None,
    keep_integers: bool = False,
) -> np.ndarray:
    """Decode a `data:` URL: everything after the first comma is base64 image bytes (§12.2).

    Raises E_IMAGE_READ when the URL has no comma or the base64 is invalid, then as `decode_image_bytes`.
    """
    if not url.startswith("data:") or "," not in url:
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"The image {name} is not a data: URL with a comma before its data.")
    payload = "".join(url.split(",", 1)[1].split())  # line breaks inside long base64 are common and harmless
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DlwatchdError(ErrorCode.IMAGE_READ, f"The image {name} holds invalid base64 data: {exc}.") from None
    return decode_image_bytes(
        data, name=name, max_pixels=max_pixels, expected_channels=expected_channels, keep_integers=keep_integers
    )


def _mask_labels_error(name: str, problem: str) -> DlwatchdError:
    return DlwatchdError(
        ErrorCode.MASK_LABELS,
        f"The mask {name} {problem}.",
        hint="Export masks as 8- or 16-bit grayscale or palette images holding one class index per pixel.",
    )


def read_mask(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a label mask into an H×W int64 array (§3.4); label ranges are the caller's check.

    Palette PNGs give their indices, not colours. RGB(A)/LA masks are accepted only when the colour channels
    are identical (alpha is ignored); float masks must be integral. Raises E_MASK_LABELS for anything else,
    E_IMAGE_READ / E_IMAGE_TOO_LARGE as `read_image`.
    """
    name = str(path)
    pixels = _read_file(path, max_pixels, None, palette_indices=True).pixels
    channels = pixels.shape[2]
    if channels > 4:
        raise _mask_labels_error(name, f"has {channels} channels; a mask must have one")
    colour = pixels[:, :, : 3 if channels >= 3 else 1]
    labels = colour[:, :, 0]
    if colour.shape[2] > 1 and not all(np.array_equal(labels, colour[:, :, c]) for c in range(1, colour.shape[2])):
        raise _mask_labels_error(name, "is a colour image whose red, green and blue channels differ")
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        if not finite.all():
            raise _mask_labels_error(name, "holds non-finite values (NaN or infinity)")
        fractional = labels[(labels != np.round(labels)) | (np.abs(labels) > 2**53)]
        if fractional.size:
            raise _mask_labels_error(name, f"holds non-integer values such as {float(fractional[0])!r}")
    return labels.astype(np.int64)


def select_channels(image: np.ndarray, selected: list[int] | None, *, name: str) -> np.ndarray:
    """H×W×K' from an H×W or H×W×K image: `None`/`[]` keeps all channels, otherwise the listed ones in order.

    A 2-D image gets its channel axis first, so `[0]` works on grayscale. Raises E_CHANNELS naming the first
    out-of-range index and the file's channel count.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise DlwatchdError(
            ErrorCode.CHANNELS, f"The image {name} has {image.ndim} axes; expected height, width, channels."
        )
    if not selected:
        return image
    count = image.shape[2]
    for index in selected:
        if not 0 <= index < count:
            raise DlwatchdError(
                ErrorCode.CHANNELS,
                f"Selected channel {index} does not exist in {name}, which has {count} channel(s) (0..{count - 1}).",
                field="input_config.selected_channels",
            )
    return image[:, :, list(selected)]
