"""The shared image and mask reader on real TIFF/PNG/JPEG files made here: dtypes, axes, modes, limits, damage."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from dlwatchd.engine.io import (
    decode_image_bytes,
    read_data_url,
    read_image,
    read_image_and_depth,
    read_mask,
    select_channels,
)
from dlwatchd.errors import DlwatchdError, ErrorCode

RNG = np.random.default_rng(7)


def _fails(code: ErrorCode, needle: str, call, *args, **kwargs) -> DlwatchdError:
    with pytest.raises(DlwatchdError) as info:
        call(*args, **kwargs)
    assert info.value.code == code, info.value.message
    assert needle in info.value.message
    return info.value


def _png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **params)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "uint32", "int32", "float32", "float64"])
def test_tiff_dtypes_keep_raw_units(tmp_path: Path, dtype: str) -> None:
    data = (RNG.random((6, 7)) * 1000).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", data)
    image, depth = read_image_and_depth(tmp_path / "a.tif")
    assert image.shape == (6, 7, 1) and image.dtype == np.float32 and image.flags.writeable
    np.testing.assert_array_equal(image[:, :, 0], data.astype(np.float32))
    assert depth == np.dtype(dtype).itemsize * 8


def test_tiff_rgb_16bit_and_planar(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 65535, (5, 6, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "rgb.tif"), rgb)
    tifffile.imwrite(tmp_path / "planar.tif", rgb.transpose(2, 0, 1), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), rgb)


def test_tiff_five_channels_chw_and_hwc_with_axes(tmp_path: Path) -> None:
    hwc = RNG.integers(0, 4000, (9, 8, 5), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "chw.tif", hwc.transpose(2, 0, 1), metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "hwc.tif", hwc, metadata={"axes": "YXC"})
    tifffile.imwrite(tmp_path / "plain.tif", hwc.transpose(2, 0, 1))  # tifffile calls the first axis Q
    for name in ("chw.tif", "hwc.tif", "plain.tif"):
        np.testing.assert_array_equal(read_image(tmp_path / name), hwc)


def test_tiff_length_one_axes_are_dropped(tmp_path: Path) -> None:
    data = RNG.integers(0, 255, (1, 1, 4, 6), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, metadata={"axes": "TZYX"})
    assert read_image(tmp_path / "a.tif").shape == (4, 6, 1)
    tifffile.imwrite(tmp_path / "row.tif", np.zeros((1, 6), np.uint8))  # Y of length 1 stays
    assert read_image(tmp_path / "row.tif").shape == (1, 6, 1)


def test_tiff_with_four_real_axes_is_refused(tmp_path: Path) -> None:
    tifffile.imwrite(
        tmp_path / "stack.tif", np.zeros((2, 3, 4, 5), np.uint8), photometric="minisblack", metadata={"axes": "ZCYX"}
    )
    _fails(ErrorCode.IMAGE_READ, "stack.tif", read_image, tmp_path / "stack.tif")


def test_tiff_unsupported_sample_type(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 4), np.complex64))
    _fails(ErrorCode.IMAGE_READ, "c.tif", read_image, tmp_path / "c.tif")


def test_nan_in_float_tiff(tmp_path: Path) -> None:
    data = np.ones((4, 4), np.float32)
    data[1, 2] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", data)
    error = _fails(ErrorCode.NONFINITE_INPUT, "nan.tif", read_image, tmp_path / "nan.tif")
    assert "1 non-finite" in error.message
    tifffile.imwrite(tmp_path / "big.tif", np.full((2, 2), 1e300))  # overflows float32
    _fails(ErrorCode.NONFINITE_INPUT, "big.tif", read_image, tmp_path / "big.tif")


def _huge_tiff(path: Path) -> None:
    """A tiny TIFF whose header claims 100000×100000 pixels (width/length patched to LONG 100000)."""
    tifffile.imwrite(path, np.zeros((8, 8), np.uint8), metadata=None)
    with tifffile.TiffFile(path) as tif:
        offsets = {code: tif.pages[0].tags[code].offset for code in (256, 257)}
    raw = bytearray(path.read_bytes())
    for code, offset in offsets.items():
        struct.pack_into("<HHII", raw, offset, code, 4, 1, 100_000)
    path.write_bytes(bytes(raw))


def test_huge_tiff_header_is_refused_before_decoding(tmp_path: Path) -> None:
    _huge_tiff(tmp_path / "huge.tif")
    error = _fails(ErrorCode.IMAGE_TOO_LARGE, "huge.tif", read_image, tmp_path / "huge.tif")
    assert "100000 × 100000" in error.message
    _fails(ErrorCode.IMAGE_TOO_LARGE, "huge.tif", read_mask, tmp_path / "huge.tif")


def test_max_pixels_counts_channels(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((10, 10, 3), np.uint8), photometric="rgb")
    assert read_image(tmp_path / "a.tif", max_pixels=300).shape == (10, 10, 3)
    _fails(ErrorCode.IMAGE_TOO_LARGE, "a.tif", read_image, tmp_path / "a.tif", max_pixels=299)


def test_huge_png_header_is_refused_and_pillow_limit_restored(tmp_path: Path) -> None:
    raw = bytearray(_png_bytes(Image.new("L", (8, 8))))
    struct.pack_into(">II", raw, 16, 100_000, 100_000)  # IHDR width, height
    struct.pack_into(">I", raw, 29, zlib.crc32(bytes(raw[12:29])))
    (tmp_path / "huge.png").write_bytes(bytes(raw))
    before = Image.MAX_IMAGE_PIXELS
    error = _fails(ErrorCode.IMAGE_TOO_LARGE, "huge.png", read_image, tmp_path / "huge.png")
    assert "100000 × 100000" in error.message
    assert before == Image.MAX_IMAGE_PIXELS
    small = _png_bytes(Image.new("L", (2, 2)))
    _fails(ErrorCode.IMAGE_TOO_LARGE, "small", decode_image_bytes, small, name="small", max_pixels=3)
    assert decode_image_bytes(small, name="small", max_pixels=4).shape == (2, 2, 1)


def test_pillow_global_limit_neither_applies_nor_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2)  # another component's strict setting
    assert decode_image_bytes(_png_bytes(Image.new("L", (4, 4))), name="x").shape == (4, 4, 1)
    assert Image.MAX_IMAGE_PIXELS == 2


@pytest.mark.parametrize(
    ("mode", "channels", "depth"),
    [("L", 1, 8), ("LA", 2, 8), ("RGB", 3, 8), ("RGBA", 4, 8), ("I;16", 1, 16), ("1", 1, 8)],
)
def test_png_modes(tmp_path: Path, mode: str, channels: int, depth: int) -> None:
    image = Image.new(mode, (5, 4), 1 if mode in ("1",) else None)
    if mode == "I;16":
        image = Image.fromarray(np.full((4, 5), 40000, np.uint16))
    (tmp_path / "a.png").write_bytes(_png_bytes(image))
    pixels, got_depth = read_image_and_depth(tmp_path / "a.png")
    assert pixels.shape == (4, 5, channels) and got_depth == depth and pixels.dtype == np.float32
    if mode == "I;16":
        assert pixels.max() == 40000  # raw units, not rescaled
    if mode == "1":
        assert set(np.unique(pixels)) == {1.0}


def test_palette_png_becomes_rgb_and_rgba(tmp_path: Path) -> None:
    image = Image.new("P", (3, 2))
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 0), 1)
    pixels = decode_image_bytes(_png_bytes(image), name="p.png")
    assert pixels.shape == (2, 3, 3) and list(pixels[0, 1]) == [200, 100, 50]
    pixels = decode_image_bytes(_png_bytes(image, transparency=0), name="pt.png")
    assert pixels.shape == (2, 3, 4) and pixels[0, 0, 3] == 0 and pixels[0, 1, 3] == 255


def test_jpeg_and_content_signature_beats_extension(tmp_path: Path) -> None:
    rgb = Image.fromarray(RNG.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    rgb.save(tmp_path / "a.JPEG", "JPEG")
    assert read_image(tmp_path / "a.JPEG").shape == (8, 8, 3)
    (tmp_path / "png-in-disguise.tif").write_bytes(_png_bytes(Image.new("L", (4, 3), 9)))
    pixels = read_image(tmp_path / "png-in-disguise.tif")
    assert pixels.shape == (3, 4, 1) and pixels.max() == 9


def test_unknown_signature_truncated_and_empty_files(tmp_path: Path) -> None:
    (tmp_path / "notes.png").write_text("hello, not an image")
    _fails(ErrorCode.IMAGE_READ, "notes.png", read_image, tmp_path / "notes.png")
    (tmp_path / "empty.png").write_bytes(b"")
    _fails(ErrorCode.IMAGE_READ, "empty.png", read_image, tmp_path / "empty.png")
    data = _png_bytes(Image.fromarray(RNG.integers(0, 255, (64, 64), dtype=np.uint8)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    error = _fails(ErrorCode.IMAGE_READ, "cut.png", read_image, tmp_path / "cut.png")
    assert "cannot be decoded:" in error.message
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.zeros((32, 32), np.uint16))
    (tmp_path / "cut.tif").write_bytes(tiff.getvalue()[:100])
    _fails(ErrorCode.IMAGE_READ, "cut.tif", read_image, tmp_path / "cut.tif")


def test_read_image_refuses_a_symlinked_file(tmp_path: Path) -> None:
    (tmp_path / "real.png").write_bytes(_png_bytes(Image.new("L", (2, 2))))
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    _fails(ErrorCode.PATH_NOT_ALLOWED, "link.png", read_image, tmp_path / "link.png")


def test_data_urls() -> None:
    png = _png_bytes(Image.new("RGB", (3, 2), (1, 2, 3)))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    pixels = read_data_url(url, name="tile-7")
    assert pixels.shape == (2, 3, 3) and list(pixels[1, 2]) == [1, 2, 3]
    wrapped = url[:40] + "\n" + url[40:]  # line-wrapped base64 is common
    assert read_data_url(wrapped, name="tile-7").shape == (2, 3, 3)
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, np.full((2, 2, 5), 7, np.float32), metadata={"axes": "YXC"})
    tiff_url = "data:application/octet-stream;base64," + base64.b64encode(tiff.getvalue()).decode()
    assert read_data_url(tiff_url, name="t").shape == (2, 2, 5)
    _fails(ErrorCode.IMAGE_READ, "tile-8", read_data_url, "data:image/png;base64,@@@not-base64", name="tile-8")
    _fails(ErrorCode.IMAGE_READ, "tile-9", read_data_url, "data:image/png;base64", name="tile-9")
    _fails(
        ErrorCode.IMAGE_READ, "tile-10", read_data_url, "data:," + base64.b64encode(b"GIF89a").decode(), name="tile-10"
    )


def test_masks_from_gray_palette_16bit_and_tiff(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 255], [2, 1, 0]], np.uint8)
    (tmp_path / "l.png").write_bytes(_png_bytes(Image.fromarray(labels)))
    palette = Image.frombytes("P", (3, 2), labels.tobytes())
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [9, 9, 9] * 253)  # colours unrelated to indices
    (tmp_path / "p.png").write_bytes(_png_bytes(palette))
    (tmp_path / "i16.png").write_bytes(_png_bytes(Image.fromarray(labels.astype(np.uint16) * 200)))
    tifffile.imwrite(tmp_path / "m.tif", labels.astype(np.uint32) + 70000)
    tifffile.imwrite(tmp_path / "f.tif", labels.astype(np.float32))
    for name, expected in [("l.png", labels), ("p.png", labels), ("i16.png", labels.astype(np.int64) * 200)]:
        mask = read_mask(tmp_path / name)
        assert mask.dtype == np.int64 and mask.shape == (2, 3)
        np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.tif"), labels.astype(np.int64) + 70000)
    np.testing.assert_array_equal(read_mask(tmp_path / "f.tif"), labels)


def test_masks_rgb_must_be_gray(tmp_path: Path) -> None:
    gray = np.repeat(np.array([[0, 1], [1, 255]], np.uint8)[:, :, None], 3, axis=2)
    (tmp_path / "gray.png").write_bytes(_png_bytes(Image.fromarray(gray)))
    np.testing.assert_array_equal(read_mask(tmp_path / "gray.png"), gray[:, :, 0])
    rgba = np.concatenate([gray, np.full((2, 2, 1), 17, np.uint8)], axis=2)  # alpha ignored
    (tmp_path / "rgba.png").write_bytes(_png_bytes(Image.fromarray(rgba)))
    np.testing.assert_array_equal(read_mask(tmp_path / "rgba.png"), gray[:, :, 0])
    colour = gray.copy()
    colour[0, 0, 1] = 5
    (tmp_path / "colour.png").write_bytes(_png_bytes(Image.fromarray(colour)))
    error = _fails(ErrorCode.MASK_LABELS, "colour.png", read_mask, tmp_path / "colour.png")
    assert "channels differ" in error.message


def test_masks_float_must_be_integral_and_single_channel(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "half.tif", np.array([[0.0, 0.5]], np.float32))
    error = _fails(ErrorCode.MASK_LABELS, "half.tif", read_mask, tmp_path / "half.tif")
    assert "0.5" in error.message
    tifffile.imwrite(tmp_path / "nan.tif", np.array([[0.0, np.nan]], np.float32))
    _fails(ErrorCode.MASK_LABELS, "nan.tif", read_mask, tmp_path / "nan.tif")
    tifffile.imwrite(tmp_path / "five.tif", np.zeros((5, 4, 4), np.uint8), metadata={"axes": "CYX"})
    _fails(ErrorCode.MASK_LABELS, "five.tif", read_mask, tmp_path / "five.tif")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _fails(ErrorCode.IMAGE_READ, "bad.png", read_mask, tmp_path / "bad.png")


def test_select_channels() -> None:
    gray = np.arange(12, dtype=np.float32).reshape(3, 4)
    picked = select_channels(gray, [0], name="g.png")  # the reference's IndexError case
    assert picked.shape == (3, 4, 1)
    np.testing.assert_array_equal(picked[:, :, 0], gray)
    assert select_channels(gray, None, name="g.png").shape == (3, 4, 1)
    five = RNG.random((3, 4, 5)).astype(np.float32)
    assert select_channels(five, [], name="f").shape == (3, 4, 5)
    np.testing.assert_array_equal(select_channels(five, [4, 0], name="f"), five[:, :, [4, 0]])
    error = _fails(ErrorCode.CHANNELS, "f.tif", select_channels, five, [1, 5], name="f.tif")
    assert "5" in error.message and "5 channel(s)" in error.message
    assert error.field == "input_config.selected_channels"
    _fails(ErrorCode.CHANNELS, "g.png", select_channels, gray, [-1], name="g.png")


def test_keep_integers_returns_8_and_16_bit_pixels_as_stored(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "a.png")
    deep = np.random.default_rng(1).integers(0, 65536, (6, 7, 4), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "b.tif", deep, photometric="minisblack", planarconfig="contig")
    floats = np.random.default_rng(2).random((5, 5, 2)).astype(np.float32)
    tifffile.imwrite(tmp_path / "c.tif", floats, photometric="minisblack", planarconfig="contig")
    kept = read_image(tmp_path / "a.png", keep_integers=True)
    assert kept.dtype == np.uint8 and np.array_equal(kept, rgb)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb.astype(np.float32))
    kept = read_image(tmp_path / "b.tif", keep_integers=True)
    assert kept.dtype == np.uint16 and np.array_equal(kept, deep)
    assert read_image(tmp_path / "c.tif", keep_integers=True).dtype == np.float32  # floats are never integers
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    assert read_data_url(url, name="tile", keep_integers=True).dtype == np.uint8
