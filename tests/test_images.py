"""dense.images: every input case decodes correctly or fails with a clear ImageError.

All inputs are made here (tmp_path, Pillow, numpy); nothing is downloaded.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dense import images
from dense.images import DecodedImage, ImageError, read_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _save(path: Path, im: Image.Image, **kwargs: object) -> Path:
    im.save(path, **kwargs)
    return path


def _noise(w: int, h: int) -> Image.Image:
    """Incompressible pixels, so a cut lands in the middle of the pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8))


def _png_bomb(path: Path, width: int, height: int, bit_depth: int, color_type: int) -> Path:
    """A valid PNG of zeros, built chunk by chunk: the file is tiny, the header is huge.

    (Pillow cannot make it: it would allocate the whole image first.)
    """
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    channels = {0: 1, 2: 3}[color_type]
    row = bytes(1 + (width * channels * bit_depth + 7) // 8)  # filter byte + samples
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row * 100) for _ in range(height // 100)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def _exif_rotated_jpeg(path: Path) -> Path:
    """Stored 40 wide × 20 high with a red block top-left; EXIF orientation 6 says "rotate 90°
    clockwise to view", so upright it is 20 × 40 with the block top-right."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:8, :8] = RED
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(path, Image.fromarray(a), format="JPEG", quality=95, exif=exif.tobytes())


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, BLUE)]
    return _save(path, frames[0], format=fmt, save_all=True, append_images=frames[1:],
                 duration=100, loop=0)


def _palette(path: Path, transparent: bool) -> Path:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([*RED, *BLUE] + [0] * 762)
    im.putpixel((0, 0), 1)
    return _save(path, im, format="PNG", **({"transparency": 0} if transparent else {}))


# --- files that must decode: (maker, expected shape, check on the result) ---------------------

Check = Callable[[DecodedImage], None]


def _pixel(y: int, x: int, rgb: tuple[int, int, int], tol: int = 0) -> Check:
    def check(d: DecodedImage) -> None:
        assert np.abs(d.rgb[y, x].astype(int) - rgb).max() <= tol, d.rgb[y, x]
    return check


def _check_16bit(d: DecodedImage) -> None:
    assert d.source_mode == "I;16"
    assert d.rgb[0, :, 0].tolist() == [0, 0, 1, 255]  # 0, 255, 256, 65535 >> 8
    assert d.alpha is None


def _check_la(d: DecodedImage) -> None:
    assert d.source_mode == "LA" and d.rgb[0, 0].tolist() == [100] * 3
    assert d.alpha is not None and d.alpha[0, 0] == 50


def _check_rgba(d: DecodedImage) -> None:
    assert d.rgb[0, 0].tolist() == [10, 20, 30]
    assert d.alpha is not None and d.alpha.tolist() == [[40, 40, 40]] * 2


def _check_cmyk(d: DecodedImage) -> None:
    assert d.source_mode == "CMYK" and d.alpha is None
    assert np.abs(d.rgb[2, 2].astype(int) - (255, 255, 255)).max() <= 3  # C=M=Y=K=0: white
    assert np.abs(d.rgb[2, 13].astype(int) - (0, 255, 255)).max() <= 3  # full cyan


def _cmyk_jpeg(path: Path) -> Path:
    im = Image.new("CMYK", (16, 8), (0, 0, 0, 0))
    im.paste((255, 0, 0, 0), (8, 0, 16, 8))
    return _save(path, im, format="JPEG", quality=95)


def _check_palette(transparent: bool) -> Check:
    def check(d: DecodedImage) -> None:
        assert d.source_mode == "P"
        assert d.rgb[0, 0].tolist() == list(BLUE) and d.rgb[1, 1].tolist() == list(RED)
        if transparent:
            assert d.alpha is not None and d.alpha[0, 0] == 255 and d.alpha[1, 1] == 0
        else:
            assert d.alpha is None
    return check


def _check_exif(d: DecodedImage) -> None:
    assert d.orientation_applied
    assert np.abs(d.rgb[3, -4].astype(int) - RED).max() < 40  # the block is top-right
    assert d.rgb[3, 3].max() < 40 and d.rgb[-4, 3].max() < 40  # the other corners are black


GOOD_FILES: dict[str, tuple[Callable[[Path], Path], tuple[int, int], Check]] = {
    "1x1": (lambda p: _save(p / "a.png", Image.new("RGB", (1, 1), RED)), (1, 1),
            _pixel(0, 0, RED)),
    "2x3": (lambda p: _save(p / "a.png", Image.new("RGB", (2, 3), BLUE)), (3, 2),
            _pixel(2, 1, BLUE)),
    "1-bit": (lambda p: _save(p / "a.png", Image.new("1", (3, 2), 1)), (2, 3),
              _pixel(0, 0, (255, 255, 255))),
    "grey": (lambda p: _save(p / "a.png", Image.new("L", (3, 2), 77)), (2, 3),
             _pixel(1, 2, (77, 77, 77))),
    "grey+alpha": (lambda p: _save(p / "a.png", Image.new("LA", (3, 2), (100, 50))), (2, 3),
                   _check_la),
    "rgba": (lambda p: _save(p / "a.png", Image.new("RGBA", (3, 2), (10, 20, 30, 40))), (2, 3),
             _check_rgba),
    "16-bit": (lambda p: _save(p / "a.png", Image.fromarray(
        np.array([[0, 255, 256, 65535]], np.uint16))), (1, 4), _check_16bit),
    "float": (lambda p: _save(p / "a.tif", Image.fromarray(
        np.array([[0.0, 0.5, 1.0]], np.float32))), (1, 3), _pixel(0, 1, (128, 128, 128))),
    "cmyk-jpeg": (lambda p: _cmyk_jpeg(p / "a.jpg"), (8, 16), _check_cmyk),
    "palette": (lambda p: _palette(p / "a.png", False), (4, 4), _check_palette(False)),
    "palette+transparency": (lambda p: _palette(p / "a.png", True), (4, 4), _check_palette(True)),
    "exif-rotated": (lambda p: _exif_rotated_jpeg(p / "a.jpg"), (40, 20), _check_exif),
    "animated-gif": (lambda p: _animated(p / "a.gif", "GIF"), (8, 8), _pixel(4, 4, RED)),
    "animated-png": (lambda p: _animated(p / "a.png", "PNG"), (8, 8), _pixel(4, 4, RED)),
    "animated-webp": (lambda p: _animated(p / "a.webp", "WEBP"), (8, 8), _pixel(4, 4, RED, 8)),
    "wide": (lambda p: _save(p / "a.png", Image.new("RGB", (10000, 3), RED)), (3, 10000),
             _pixel(2, 9999, RED)),
    "tall": (lambda p: _save(p / "a.png", Image.new("RGB", (3, 10000), RED)), (10000, 3),
             _pixel(9999, 2, RED)),
}


@pytest.mark.parametrize("case", GOOD_FILES)
def test_decodes(case: str, tmp_path: Path) -> None:
    make, shape, check = GOOD_FILES[case]
    decoded = read_image(make(tmp_path))
    assert decoded.rgb.shape == (*shape, 3) and decoded.rgb.dtype == np.uint8
    assert decoded.rgb.flags.c_contiguous
    assert decoded.alpha is None or decoded.alpha.shape == shape
    if case != "exif-rotated":
        assert not decoded.orientation_applied
    check(decoded)


def test_path_bytes_and_pil_agree(tmp_path: Path) -> None:
    path = _exif_rotated_jpeg(tmp_path / "a.jpg")
    by_path, by_str = read_image(path), read_image(str(path))
    by_bytes = read_image(path.read_bytes())
    with Image.open(path) as im:
        by_pil = read_image(im)
        assert im.size == (40, 20)  # the caller's image is not rotated in place
    for other in (by_str, by_bytes, by_pil):
        assert np.array_equal(other.rgb, by_path.rgb) and other.orientation_applied


# --- files that must be refused ------------------------------------------------------------

def _truncated(path: Path, fmt: str) -> Path:
    buf = io.BytesIO()
    _noise(64, 64).save(buf, fmt)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (lambda p: _save_bytes(p / "a.png", b""), r"empty \(0 bytes\)"),
    "text-as-png": (lambda p: _save_bytes(p / "a.png", b"hello, world\n" * 100),
                    r"'a\.png' is not an image despite its \.png extension \(it is 1,300 bytes "
                    r"of text\)"),
    "binary-as-jpg": (lambda p: _save_bytes(p / "a.jpg", bytes(range(256)) * 4),
                      r"not an image .*binary data"),
    "html-as-jpg": (lambda p: _save_bytes(p / "a.jpg", b"<!DOCTYPE html><html></html>"),
                    r"web page \(HTML\)"),
    "truncated-jpeg": (lambda p: _truncated(p / "a.jpg", "JPEG"), r"JPEG image is damaged"),
    "truncated-png": (lambda p: _truncated(p / "a.png", "PNG"), r"PNG image is damaged"),
    "header-only-png": (lambda p: _save_bytes(p / "a.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
                        r"not an image|damaged"),
    "eps-refused": (lambda p: _save(p / "a.eps", Image.new("RGB", (4, 4))), r"not an image"),
    "missing": (lambda p: p / "nope.png", r"There is no file"),
    "folder": (lambda p: p, r"is a folder"),
}


def _save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_FILES)
def test_refuses(case: str, tmp_path: Path) -> None:
    make, message = BAD_FILES[case]
    with pytest.raises(ImageError, match=message):
        read_image(make(tmp_path))


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize(
    ("width", "height", "max_pixels", "message"),
    [
        # 1.2 GB as RGB, refused by Pillow's bomb guard inside Image.open, reported as ours.
        (20000, 20000, None, r"400 MP, above the 50 MP limit \(set DENSE_MAX_PIXELS"),
        # Between our limit and Pillow's: our header check gives the dimensions.
        (10000, 6000, None, r"10000×6000 = 60 MP, above the 50 MP limit"),
        # Our limit raised past Pillow's: Pillow's guard still holds, and says so.
        (20000, 20000, 10**12, r"Pillow's decompression-bomb limit"),
    ],
)
def test_bomb_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: int, height: int,
    max_pixels: int | None, message: str,
) -> None:
    path = _png_bomb(tmp_path / "bomb.png", width, height, 1, 0)
    assert path.stat().st_size < 200_000
    _no_decoding(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(ImageError, match=message):
        read_image(path, max_pixels=max_pixels)
    assert time.perf_counter() - start < 0.5


def test_pixel_limit_from_env_and_argument(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (2, 3)))
    assert read_image(path, max_pixels=6).rgb.shape == (3, 2, 3)
    with pytest.raises(ImageError, match=r"2×3 = 6 pixels, above the 5 pixels limit"):
        read_image(path, max_pixels=5)
    monkeypatch.setenv("DENSE_MAX_PIXELS", "5")
    with pytest.raises(ImageError, match="DENSE_MAX_PIXELS"):
        read_image(path)
    with pytest.raises(ImageError):
        read_image(np.zeros((3, 2, 3), np.uint8))  # arrays obey the same limit
    assert read_image(path, max_pixels=6).rgb.shape == (3, 2, 3)  # the argument wins
    monkeypatch.setenv("DENSE_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="DENSE_MAX_PIXELS must be a positive integer"):
        read_image(path)


def test_file_size_limit_from_env_and_argument(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path / "a.png", _noise(32, 32))
    size = path.stat().st_size
    read_image(path, max_file_bytes=size)
    with pytest.raises(ImageError, match="MB limit"):
        read_image(path, max_file_bytes=size - 1)
    monkeypatch.setenv("DENSE_MAX_FILE_BYTES", str(size - 1))
    with pytest.raises(ImageError, match="DENSE_MAX_FILE_BYTES"):
        read_image(path.read_bytes())


# --- numpy input (Gradio, webcam frames) ----------------------------------------------------

ARRAYS: dict[str, tuple[np.ndarray, tuple[int, int, int], str]] = {
    # name: (input, rgb[0, 0], source_mode)
    "webcam 481x641x3": (np.full((481, 641, 3), (1, 2, 3), np.uint8), (1, 2, 3), "RGB"),
    "1x1x3": (np.full((1, 1, 3), 9, np.uint8), (9, 9, 9), "RGB"),
    "grey HxW": (np.full((5, 7), 60, np.uint8), (60, 60, 60), "L"),
    "grey HxWx1": (np.full((5, 7, 1), 61, np.uint8), (61, 61, 61), "L"),
    "rgba": (np.full((2, 2, 4), (1, 2, 3, 4), np.uint8), (1, 2, 3), "RGBA"),
    "float [0,1]": (np.full((3, 4, 3), 0.5, np.float32), (128, 128, 128), "RGB;float32"),
    "float [0,255]": (np.full((3, 4, 3), 200.0), (200, 200, 200), "RGB;float64"),
    "float nan": (np.array([[[np.nan, 2.0, 1.0]]]), (0, 2, 1), "RGB;float64"),
    "uint16": (np.full((2, 2, 3), 65535, np.uint16), (255, 255, 255), "RGB;uint16"),
    "int64 in range": (np.full((2, 2), 7), (7, 7, 7), "L;int64"),
    "bool": (np.ones((2, 2), bool), (255, 255, 255), "L;bool"),
    "mirrored view": (np.arange(24, dtype=np.uint8).reshape(2, 4, 3)[:, ::-1], (9, 10, 11),
                      "RGB"),
}


@pytest.mark.parametrize("case", ARRAYS)
def test_arrays(case: str) -> None:
    array, first, mode = ARRAYS[case]
    before = array.copy()
    decoded = read_image(array)
    assert decoded.rgb.shape == (*array.shape[:2], 3) and decoded.rgb.dtype == np.uint8
    assert decoded.rgb.flags.c_contiguous and decoded.rgb.base is not array
    assert decoded.rgb[0, 0].tolist() == list(first) and decoded.source_mode == mode
    assert (decoded.alpha is not None) == (mode.startswith("RGBA"))
    decoded.rgb[...] = 0
    np.testing.assert_array_equal(array, before)  # the caller's array is never aliased


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros(3, np.uint8), "got shape"),
        (np.zeros((2, 2, 2), np.uint8), "got shape"),
        (np.zeros((2, 2, 5), np.uint8), "got shape"),
        (np.zeros((3, 8, 8), np.uint8), "channels first"),
        (np.zeros((1, 2, 2, 3), np.uint8), "got shape"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.full((2, 2), 300), "cannot be mapped"),
        (np.zeros((2, 2), np.complex64), "not images"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        read_image(array)


# --- helpers --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_png_roundtrip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    decoded = read_image(images.save_png(array, tmp_path / "out.png"))
    assert read_image(images.encode_png(array)).rgb.tolist() == decoded.rgb.tolist()
    channels = shape[2] if len(shape) == 3 else 1
    expect = array[..., :3] if channels >= 3 else np.repeat(array.reshape(5, 7, 1), 3, axis=2)
    np.testing.assert_array_equal(decoded.rgb, expect)
    if channels == 4:
        np.testing.assert_array_equal(decoded.alpha, array[..., 3])


