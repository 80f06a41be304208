"""Safe image decoding: every image a user sends passes through here before a model sees it.

Inputs come as file paths, raw bytes, PIL images or numpy arrays (Gradio, webcam frames). The
output is always an upright H×W×3 uint8 RGB array plus the alpha channel if there was one, or
an :class:`ImageError` whose message can be shown to the user as is.

Memory is bounded before any pixel is decoded: the file size is checked before reading, and the
width×height from the header (``Image.open`` reads only the header) before ``load()``.

Pillow's own decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``, 89 MP; it refuses above
twice that) is left as it is rather than changed per call: the global is shared by every thread
and by Gradio's own decoding, so mutating it around a call would race. Our limit is checked on
top of it, and its ``DecompressionBombError`` becomes an :class:`ImageError`. To allow images
above 179 MP, raise ``PIL.Image.MAX_IMAGE_PIXELS`` once at start-up as well.

Truncated files are refused because Pillow raises on ``load()`` while
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (its default; this module never sets it).
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, features

try:
    from PIL import ImageCms
except ImportError:  # Pillow built without LittleCMS: CMYK falls back to the plain formula
    ImageCms = None

MAX_PIXELS: int = 50_000_000
"""Default pixel limit (width × height); ``DENSE_MAX_PIXELS`` overrides it, read at call time."""

MAX_FILE_BYTES: int = 50_000_000
"""Default file size limit in bytes; ``DENSE_MAX_FILE_BYTES`` overrides it, read at call time."""

# File name endings that folder-reading commands take as photos (all decoded by read_image).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")

# Formats we let Pillow try (JPEG covers MPO, the multi-picture JPEG of many cameras and
# phones). The rest are refused on purpose: EPS runs Ghostscript, TGA has
# no magic number (so any bytes may "open" as TGA and decode to garbage), and rarely used
# decoders are attack surface with no benefit to this app.
FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM") + (
    ("AVIF",) if features.check("avif") else ()
)

# What Pillow's parsers and decoders raise on malformed input. Caught only around Pillow calls.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
                  struct.error)


class ImageError(ValueError):
    """The input is not an image we can use; the message is meant for the end user."""


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded image in the upright frame.

    Attributes:
        rgb: H×W×3 uint8, C-contiguous, RGB order.
        alpha: H×W uint8 (255 = opaque), or None when the source had no transparency.
        source_mode: the Pillow mode of the source ("RGB", "RGBA", "P", "I;16", "CMYK", ...);
            for arrays, "L", "RGB" or "RGBA", with ";<dtype>" appended when not uint8.
        orientation_applied: True when an EXIF orientation tag rotated or flipped the image.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    source_mode: str
    orientation_applied: bool

    @property
    def height(self) -> int:
        return self.rgb.shape[0]

    @property
    def width(self) -> int:
        return self.rgb.shape[1]


def _env_limit(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        limit = int(float(value)) if any(c in value for c in ".eE") else int(value)
    except ValueError:
        limit = 0
    if limit <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return limit


def pixel_limit() -> int:
    """The pixel limit in force now: ``DENSE_MAX_PIXELS`` if set, else :data:`MAX_PIXELS`."""
    return _env_limit("DENSE_MAX_PIXELS", MAX_PIXELS)


def file_byte_limit() -> int:
    """The file size limit in force now: ``DENSE_MAX_FILE_BYTES`` or :data:`MAX_FILE_BYTES`."""
    return _env_limit("DENSE_MAX_FILE_BYTES", MAX_FILE_BYTES)


def _mp(pixels: int) -> str:
    """A pixel count for a message: "400 MP", "0.3 MP", "1,200 MP", or "6 pixels" when tiny."""
    if pixels < 100_000:
        return f"{pixels:,} pixels"
    return f"{pixels / 1e6:,.1f}".removesuffix(".0") + " MP"


def _check_pixels(width: int, height: int, limit: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"The image is empty ({width}×{height} pixels).")
    if width * height > limit:
        raise ImageError(
            f"The image is {width}×{height} = {_mp(width * height)}, above the {_mp(limit)} "
            "limit (set DENSE_MAX_PIXELS to change it)."
        )


def read_image(
    source: str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray,
    *,
    max_pixels: int | None = None,
    max_file_bytes: int | None = None,
) -> DecodedImage:
    """Decode ``source`` into an upright RGB uint8 image, refusing anything unsafe or broken.

    Args:
        source: a file path, the bytes of an image file, a PIL image, or a numpy array
            (H×W, H×W×1, H×W×3 RGB or H×W×4 RGBA; uint8, uint16, bool, float in [0, 1] when
            its maximum is ≤ 1 else [0, 255], or other integers with values in [0, 255]).
        max_pixels: pixel limit; default :func:`pixel_limit` (``DENSE_MAX_PIXELS``).
        max_file_bytes: file size limit for paths and bytes; default :func:`file_byte_limit`.

    Raises:
        ImageError: empty, oversized, truncated, corrupt or unsupported input.
        TypeError: ``source`` is of a type this function does not take (a programming error).
    """
    limit = pixel_limit() if max_pixels is None else max_pixels
    if limit <= 0:
        raise ValueError(f"max_pixels must be positive, got {limit}")
    if isinstance(source, np.ndarray):
        return _from_array(source, limit)
    if isinstance(source, Image.Image):
        return _from_pil(source, limit)
    byte_limit = file_byte_limit() if max_file_bytes is None else max_file_bytes
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return _from_bytes(_read_file(path, byte_limit), limit, f"'{path.name}'", path.suffix)
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > byte_limit:
            raise _too_big(len(data), byte_limit, "The file")
        return _from_bytes(data, limit, "The file", "")
    raise TypeError(f"read_image takes a path, bytes, a PIL image or a numpy array, "
                    f"not {type(source).__name__}")


def _too_big(size: int, limit: int, name: str) -> ImageError:
    return ImageError(f"{name} is {size / 1e6:,.1f} MB, above the {limit / 1e6:,.1f} MB limit "
                      "(set DENSE_MAX_FILE_BYTES to change it).")


def _read_file(path: Path, limit: int) -> bytes:
    """Read at most ``limit`` bytes; the stat is the early refusal, the bounded read the real
    one (the file may grow in between, or be a pipe or a device with no meaningful size)."""
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise ImageError(f"'{path.name}' is a folder, not an image file.")
        if size > limit:
            raise _too_big(size, limit, f"'{path.name}'")
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ImageError(f"There is no file '{path}'.") from None
    except PermissionError:
        raise ImageError(f"The file '{path.name}' cannot be read (permission denied).") from None
    if len(data) > limit:
        raise _too_big(len(data), limit, f"'{path.name}'")
    return data


def _describe(data: bytes) -> str:
    """What non-image bytes look like, so the user learns what they actually sent."""
    head = data[:1024]
    low = head.lstrip().lower()
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftyphevc", b"ftypmif1", b"ftypmsf1"):
        return "a HEIC/HEIF photo, which this app cannot read; export it as JPEG or PNG"
    if head[4:12] in (b"ftypavif", b"ftypavis") and "AVIF" not in FORMATS:
        return "an AVIF image, which this installation cannot read; export it as JPEG or PNG"
    if head.startswith(b"%PDF"):
        return f"a PDF document of {len(data):,} bytes"
    if b"<svg" in low:
        return "an SVG drawing (a vector format); export it as PNG"
    if low.startswith((b"<!doctype html", b"<html")):
        return f"a web page (HTML) of {len(data):,} bytes"
    return f"{len(data):,} bytes of {'text' if _looks_like_text(head) else 'binary data'}"


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return False
        text = head[: err.start].decode("utf-8")  # a character cut by the sample's end
    return all(c.isprintable() or c in "\t\n\r\f" for c in text)


def _from_bytes(data: bytes, limit: int, name: str, suffix: str) -> DecodedImage:
    if not data:
        raise ImageError(f"{name} is empty (0 bytes).")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as err:
        raise _bomb_error(err, limit) from None
    except Image.UnidentifiedImageError:
        hint = f" despite its {suffix} extension" if suffix else ""
        raise ImageError(
            f"{name} is not an image{hint} (it is {_describe(data)}). "
            f"Accepted formats: {', '.join(FORMATS)}."
        ) from None
    except _DECODE_ERRORS as err:  # raised by the header parser inside Image.open
        raise ImageError(f"{name} is a damaged image ({err}).") from None
    with im:
        return _from_pil(im, limit)


def _bomb_error(err: Image.DecompressionBombError, limit: int) -> ImageError:
    """Pillow refused in Image.open before we saw the size; its message has the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    pixels = int(found.group(1)) if found else 0
    if pixels > limit or not found:
        size = _mp(pixels) if found else "too large"
        return ImageError(f"The image is {size}, above the {_mp(limit)} limit "
                          "(set DENSE_MAX_PIXELS to change it).")
    pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return ImageError(
        f"The image is {_mp(pixels)}, above Pillow's decompression-bomb limit of "
        f"{_mp(pillow_limit)} (raise PIL.Image.MAX_IMAGE_PIXELS at start-up to change it)."
    )


def _from_pil(im: Image.Image, limit: int) -> DecodedImage:
    """Check the size from the header, then decode; ``im`` (the caller's) is never modified."""
    _check_pixels(im.width, im.height, limit)
    source_mode = im.mode
    try:
        im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
    except Image.DecompressionBombError as err:
        raise _bomb_error(err, limit) from None
    except _DECODE_ERRORS as err:
        kind = f"{im.format} " if im.format else ""
        raise ImageError(f"The {kind}image is damaged or incomplete ({err}); "
                         "try exporting or uploading it again.") from None
    im, oriented = _upright(im)
    rgb, alpha = _to_rgb(im)
    return DecodedImage(np.ascontiguousarray(rgb), alpha, source_mode, oriented)


def _upright(im: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation (phones store sensor-frame pixels plus a rotation tag)."""
    try:
        orientation = im.getexif().get(ExifTags.Base.Orientation)
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            return ImageOps.exif_transpose(im), True
    except _DECODE_ERRORS:  # broken EXIF is no reason to refuse the pixels
        pass
    return im, False


def _to_rgb(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        # High-bit-depth grey: Pillow's convert("L") clips 16-bit values at 255, so scale here.
        raw = np.array(im)
        grey = _scale_to_uint8(raw, mode)
        alpha = None
        transparency = im.info.get("transparency")
        if isinstance(transparency, int):
            alpha = np.where(raw == transparency, 0, 255).astype(np.uint8)
        return cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB), alpha
    try:
        if mode == "CMYK":
            return np.array(_cmyk_to_rgb(im)), None
        if im.has_transparency_data:  # LA, RGBA, PA, La, RGBa, P/L/RGB with a tRNS key
            rgba = np.array(im.convert("RGBA"))
            return rgba[..., :3], np.ascontiguousarray(rgba[..., 3])
        return np.array(im.convert("RGB")), None
    except ValueError as err:  # a mode Pillow cannot convert to RGB (e.g. LAB)
        raise ImageError(f"Images in colour mode {mode} are not supported ({err}).") from None


def _cmyk_to_rgb(im: Image.Image) -> Image.Image:
    """CMYK → sRGB through the embedded ICC profile when there is one (print JPEGs usually
    have one, and the plain formula is visibly off for them), else Pillow's formula."""
    icc = im.info.get("icc_profile")
    if icc and ImageCms is not None:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken or non-CMYK profile: the formula is better than refusing
    return im.convert("RGB")


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Map any numeric array to uint8 by the range of its type (not by clipping)."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "u" and a.dtype.itemsize == 2:
        return (a >> 8).astype(np.uint8)  # 65535 → 255, 256 → 1
    if a.dtype.kind == "f":
        f = np.nan_to_num(a.astype(np.float32, copy=False), nan=0.0, posinf=255.0, neginf=0.0)
        if f.size and f.max() <= 1.0:
            f = f * 255.0
        return np.clip(np.rint(f), 0, 255).astype(np.uint8)
    if a.dtype.kind in "iu":
        low, high = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if mode == "I" and low >= 0 and high <= 65535:
            # Pillow's mode I is a 32-bit container; from PNG/TIFF it holds 16-bit samples.
            return (a >> 8).astype(np.uint8)
        if mode != "I" and low >= 0 and high <= 255:
            return a.astype(np.uint8)
        raise ImageError(f"Image values from {low} to {high} ({a.dtype}) cannot be mapped to "
                         "8 bits; use uint8, uint16 or float in [0, 1].")
    raise ImageError(f"Arrays of type {a.dtype} are not images; use uint8, uint16 or float.")


def _from_array(a: np.ndarray, limit: int) -> DecodedImage:
    """Gradio and webcam frames: H×W, H×W×1, H×W×3 (RGB) or H×W×4 (RGBA)."""
    channels = a.shape[2] if a.ndim == 3 else 1
    if a.ndim not in (2, 3) or channels not in (1, 3, 4):
        hint = " (channels first? use H×W×C)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"An image array must be H×W, H×W×1, H×W×3 or H×W×4; "
                         f"got shape {a.shape}{hint}.")
    _check_pixels(a.shape[1], a.shape[0], limit)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    if a.dtype != np.uint8:
        mode += f";{a.dtype}"
    pixels = _scale_to_uint8(a, "")
    alpha = np.array(pixels[..., 3]) if channels == 4 else None  # np.array: always a copy
    if channels == 3:
        rgb = np.array(pixels, order="C")
    else:
        grey = pixels if a.ndim == 2 else pixels[..., 0]
        rgb = np.repeat(grey[..., None], 3, axis=2) if channels == 1 else pixels[..., :3].copy()
    return DecodedImage(rgb, alpha, mode, False)


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes for an H×W (grey), H×W×3 (RGB) or H×W×4 (RGBA) uint8/uint16 array."""
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png takes uint8 or uint16, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(np.ascontiguousarray(array), code)  # OpenCV writes BGR order
    elif array.ndim != 2:
        raise ValueError(f"encode_png takes H×W, H×W×3 or H×W×4, not shape {array.shape}")
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise ValueError("OpenCV could not encode the array as PNG")
    return buf.tobytes()


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write ``array`` as a lossless PNG to ``path`` (see :func:`encode_png`); returns the path."""
    path = Path(path)
    path.write_bytes(encode_png(array))
    return path


def to_tensor(rgb: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """H×W×C uint8 (RGB) → 1×C×H×W float32 in [0, 1], the layout and range every model here
    takes; on ``device`` when given. The one place this conversion is written."""
    tensor = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float() / 255
    return tensor.to(device) if device is not None else tensor


def to_batch(images: list[np.ndarray] | np.ndarray) -> torch.Tensor:
    """N H×W×3 uint8 RGB images (equal sizes) → N×3×H×W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2) \
        .float() / 255
