"""Load and validate one image reference, so every model sees an upright RGB image of sane size.

Accepted references: local path (relative paths resolve against ``base_dir``, the dataset file's
folder, only; without one, against the working directory), ``http(s)://`` URL (fetched by ``fetch.py``:
timeout, one retry, size cap, per-split budget), base64 string or ``data:`` URI, raw bytes, a PIL image, a
numpy HWC array and HF datasets image dicts ``{"bytes": ..., "path": ...}``. Any other URL scheme
(``file://``, ``ftp://``, ...) is refused. Images over PIL's ``Image.MAX_IMAGE_PIXELS`` are refused too.

Every failure raises :class:`ImageLoadError` (a ``ValueError``) naming the row index and the source.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlm_lightning.models.families import DEFAULT_MIN_SIDE  # smaller sides get hallucinated over

from .fetch import MAX_IMAGE_BYTES, FetchBudget, FetchError, fetch_url

MAX_ASPECT_RATIO = 200.0  # Qwen-VL's smart_resize refuses larger ratios
_B64_RE = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


class ImageLoadError(ValueError):
    """An image reference that cannot be turned into a usable RGB image (names the row and the source)."""


class ImageFetchTimeout(ImageLoadError):
    """An image URL whose server did not answer in time (skip mode counts these apart from bad rows)."""


def may_be_base64(ref: str) -> bool:
    """Whether the string ``ref`` could be a base64 image rather than a path (long, base64 alphabet only)."""
    return len(ref) >= 32 and _B64_RE.match(ref) is not None


def describe_ref(ref: Any, limit: int = 80) -> str:
    """Short, printable description of an image reference (long base64 strings are truncated; objects are
    named by their type, never by a ``<... object at 0x...>`` repr)."""
    if isinstance(ref, Image.Image):
        return f"<PIL image mode={ref.mode} size={ref.size[0]}x{ref.size[1]}>"
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return f"bytes ({len(ref)} B)"
    if isinstance(ref, np.ndarray):
        return f"<array shape={tuple(ref.shape)} dtype={ref.dtype}>"
    if isinstance(ref, Mapping):
        b = ref.get("bytes")
        return f"<image dict path={ref.get('path')!r} bytes={'None' if b is None else len(b)}>"
    if ref is not None and not isinstance(ref, (str, os.PathLike, int, float)):
        return type(ref).__name__
    s = str(ref)
    if len(s) > limit:
        return repr(s[: limit // 2] + f"...<{len(s)} chars>")
    return repr(s)


def load_image(
    ref: Any,
    row_index: int | None = None,
    base_dir: str | os.PathLike | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    min_side: int = DEFAULT_MIN_SIDE,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
    timeout: float = 10.0,
    retries: int = 1,
    max_bytes: int | None = MAX_IMAGE_BYTES,
    budget: FetchBudget | None = None,
) -> Image.Image:
    """Load ``ref`` as an upright RGB PIL image within ``[min_pixels, max_pixels]`` (aspect ratio kept).

    Raises ``ImageLoadError`` (a ``ValueError``) naming ``row_index`` and the source for missing,
    empty, corrupt or truncated files, unreachable URLs (``ImageFetchTimeout`` when the server did not
    answer), refused URL schemes, URLs and ``data:`` URIs over ``max_bytes``, images over PIL's
    ``Image.MAX_IMAGE_PIXELS`` and degenerate images (a side under ``min_side`` px or an aspect ratio over
    ``max_aspect_ratio``). URLs: ``timeout`` seconds per attempt, ``retries + 1`` attempts, within ``budget``.

    Example:
        >>> img = load_image("images/0001.png", row_index=3, base_dir="data/", max_pixels=512 * 512)
        >>> img.mode
        'RGB'
    """
    where = f"row {row_index}" if row_index is not None else "image"
    source = describe_ref(ref)

    def fail(reason: str, kind: type[ImageLoadError] = ImageLoadError) -> ImageLoadError:
        if len(reason) > 300:  # PIL echoes file names, which may be whole base64 strings
            reason = reason[:300] + "..."
        return kind(f"{where}: cannot use image {source}: {reason}")

    try:
        img = _open(ref, base_dir, _Fetch(timeout, retries, max_bytes, budget))
    except ImageLoadError as e:
        raise fail(str(e)) from None
    except FetchError as e:
        raise fail(str(e), ImageFetchTimeout if e.timed_out else ImageLoadError) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise fail(f"corrupt or unreadable image ({type(e).__name__}: {e})") from None

    w, h = img.size
    _check_geometry(w, h, min_side, max_aspect_ratio, fail)
    img = to_rgb(img)
    img = resize_to_pixel_bounds(img, min_pixels, max_pixels)
    if (img.size != (w, h)) and min(img.size) < min_side:
        raise fail(
            f"max_pixels={max_pixels} shrinks this {w}x{h} image to {img.size[0]}x{img.size[1]}, "
            f"below the minimum side of {min_side}px"
        )
    return img


def _check_geometry(w: int, h: int, min_side: int, max_aspect_ratio: float, fail) -> None:
    if w == 0 or h == 0:
        raise fail(f"empty image ({w}x{h})")
    if min(w, h) < min_side:
        raise fail(f"degenerate size {w}x{h}: a side is under the minimum of {min_side}px")
    if max(w, h) / min(w, h) > max_aspect_ratio:
        raise fail(f"degenerate aspect ratio {max(w, h) / min(w, h):.0f} ({w}x{h}) exceeds {max_aspect_ratio:g}")


# ----------------------------------------------------------------------------------------------- sources


class _Fetch(NamedTuple):
    timeout: float
    retries: int
    max_bytes: int | None
    budget: FetchBudget | None


def _open(ref: Any, base_dir, fetch: _Fetch) -> Image.Image:
    """Open and fully decode ``ref`` (decoding here turns truncation into an error now, not in a worker later)."""
    if isinstance(ref, Image.Image):
        ref.load()
        return ref
    if isinstance(ref, np.ndarray):
        return Image.fromarray(ref)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return _decode(bytes(ref))
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            return _decode(bytes(ref["bytes"]))
        for key in ("path", "url", "image"):
            if ref.get(key) is not None:
                return _open(ref[key], base_dir, fetch)
        raise ImageLoadError("image dict has neither 'bytes' nor 'path'")
    if isinstance(ref, os.PathLike):
        return _open_path(Path(ref), base_dir)
    if not isinstance(ref, str):
        raise ImageLoadError(f"unsupported image reference type {type(ref).__name__}")
    if ref == "":
        raise ImageLoadError("empty image reference")
    if ref.startswith("data:"):
        header, _, payload = ref.partition(",")
        data = _b64decode(payload) if ";base64" in header else urllib.parse.unquote_to_bytes(payload)
        if fetch.max_bytes is not None and len(data) > fetch.max_bytes:
            raise ImageLoadError(f"data: URI of {len(data)} B exceeds max_image_bytes={fetch.max_bytes}")
        return _decode(data)
    if "://" in ref[:16]:  # http(s) only: fetch_url refuses file://, ftp://, ...
        return _decode(fetch_url(ref, fetch.timeout, fetch.retries, fetch.max_bytes, fetch.budget))
    path = _resolve(Path(ref).expanduser(), base_dir)
    if _is_file(path):
        return _open_path(path, None)
    if may_be_base64(ref):  # long and no file of that name: try base64
        try:
            return _decode(_b64decode(ref))
        except ImageLoadError:
            pass
    raise ImageLoadError(f"file not found: {path}")


def _resolve(path: Path, base_dir) -> Path:
    """A relative ``path`` joined with ``base_dir`` (the data file's folder) only; never a silent second try in
    the working directory, which is where it resolves when there is no ``base_dir`` (rows given in Python)."""
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. "File name too long" for a base64 string
        return False


def _open_path(path: Path, base_dir) -> Image.Image:
    path = _resolve(path, base_dir)
    if not path.is_file():
        raise ImageLoadError(f"file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"empty file (0 bytes): {path}")
    return _decode(path.read_bytes())


def _b64decode(payload: str) -> bytes:
    payload = "".join(payload.split())
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageLoadError(f"invalid base64 ({e})") from None


def _decode(data: bytes) -> Image.Image:
    if len(data) == 0:
        raise ImageLoadError("empty data (0 bytes)")
    try:
        with warnings.catch_warnings():  # PIL only warns between MAX_IMAGE_PIXELS and twice it: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # PIL's message names the BytesIO object: describe the bytes instead
        raise UnidentifiedImageError(f"not a known image format: bytes ({len(data)} B)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageLoadError(_too_many_pixels(e)) from None
    img.load()  # raises OSError("image file is truncated") for cut-off files
    return img


def _too_many_pixels(err: Exception) -> str:
    found = re.search(r"\((\d+) pixels\)", str(err))  # PIL's "Image size (N pixels) exceeds limit of ..."
    return (f"possible decompression bomb: {found.group(1) if found else 'its'} pixels exceed "
            f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}; downscale the image or raise that limit")


# ----------------------------------------------------------------------------------------------- pixels


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """EXIF-transpose ``img`` and convert it to RGB; alpha is composited on ``background``.

    Handles 1, L, LA, P (with transparency), PA, RGBA, CMYK, YCbCr, I;16*, I and F.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        img = _high_bit_depth_to_l(img)
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, background + (255,))
        canvas.alpha_composite(img)
        return canvas.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
    else:
        peak = np.nanmax(arr, initial=0.0)
        scale = 255.0 / 65535.0 if peak > 255 else 1.0  # 16-bit data (I;16 or I from a 16-bit PNG)
    arr = np.nan_to_num(arr * scale, nan=0.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def fit_to_pixel_bounds(w: int, h: int, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The size ``(w, h)`` scaled (aspect ratio kept) so that ``min_pixels <= w*h <= max_pixels``."""
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels={min_pixels} > max_pixels={max_pixels}")
    area = w * h
    if max_pixels is not None and area > max_pixels:
        s = math.sqrt(max_pixels / area)
        nw, nh = max(1, math.floor(w * s)), max(1, math.floor(h * s))
        return nw, nh
    if min_pixels is not None and area < min_pixels:
        s = math.sqrt(min_pixels / area)
        return math.ceil(w * s), math.ceil(h * s)
    return w, h


def resize_to_pixel_bounds(img: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Resize ``img`` to honour ``min_pixels``/``max_pixels``, keeping its aspect ratio."""
    size = fit_to_pixel_bounds(img.size[0], img.size[1], min_pixels, max_pixels)
    if size == img.size:
        return img
    if size[0] * size[1] < img.size[0] * img.size[1] // 4:
        img = img.reduce(max(1, min(img.size[0] // size[0], img.size[1] // size[1]) // 2))  # fast pre-shrink
    return img.resize(size, Image.Resampling.BICUBIC)
