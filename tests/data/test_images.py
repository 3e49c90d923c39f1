"""Image loading: every reference kind, every mode, EXIF, pixel bounds, and every bad-image kind."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import re
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm_lightning.data.datasets import ConversationDataset, load_rows
from vlm_lightning.data.formats import FormatOptions
from vlm_lightning.data.images import ImageLoadError, load_image


def _png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Image.Image]:
    d = tmp_path_factory.mktemp("imgs")
    img = Image.new("RGB", (64, 40), (10, 200, 30))
    img.putpixel((0, 0), (255, 0, 0))
    (d / "sub").mkdir()
    img.save(d / "sub" / "a.png")
    return d, img


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == "RGB" and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b.convert("RGB")))


# ------------------------------------------------------------------------------------ reference kinds


def test_local_relative_path_resolves_against_base_dir(sample):
    d, img = sample
    assert _same(load_image("sub/a.png", 0, base_dir=d), img)


def test_absolute_path_and_pathlike(sample):
    d, img = sample
    p = d / "sub" / "a.png"
    assert _same(load_image(str(p), 0), img)
    assert _same(load_image(p, 0), img)  # file:// URLs are refused: tests/data/test_fetch.py


def test_relative_path_never_falls_back_to_the_working_directory(sample, tmp_path, monkeypatch):
    # issue 17 item 3: img/x.png missing beside the data file but present under the cwd was loaded without a word
    d, img = sample
    data_dir, cwd = tmp_path / "data", tmp_path / "cwd"
    data_dir.mkdir()
    (cwd / "img").mkdir(parents=True)
    img.save(cwd / "img" / "x.png")
    (data_dir / "train.jsonl").write_text('{"image": "ok.png", "text": "1"}\n{"image": "img/x.png", "text": "2"}\n')
    img.save(data_dir / "ok.png")
    monkeypatch.chdir(cwd)
    src = load_rows(str(data_dir / "train.jsonl"))
    ds = ConversationDataset(src.rows, FormatOptions(base_dir=src.base_dir), lines=src.lines)
    tried = re.escape(str(data_dir.resolve() / "img" / "x.png"))
    assert _same(load_image(ds[0]["messages"][0]["content"][0]["image"], 0), img)
    with pytest.raises(ImageLoadError, match=rf"row 1: cannot use image '{tried}': file not found: {tried}$"):
        load_image(ds[1]["messages"][0]["content"][0]["image"], 1)
    beside = re.escape(str(data_dir / "img" / "x.png"))
    for ref in ("img/x.png", Path("img/x.png"), {"bytes": None, "path": "img/x.png"}):
        with pytest.raises(ImageLoadError, match=rf"row 1: .*file not found: {beside}$"):
            load_image(ref, 1, base_dir=data_dir)
    assert _same(load_image("img/x.png", 1), img)  # no data file (rows given as a Python list): the cwd


def test_base64_and_data_uri_and_urlsafe(sample):
    _, img = sample
    raw = _png_bytes(img)
    b64 = base64.b64encode(raw).decode()
    assert _same(load_image(b64, 0), img)
    assert _same(load_image("data:image/png;base64," + b64, 0), img)
    assert _same(load_image(base64.urlsafe_b64encode(raw).decode().rstrip("="), 0), img)


def test_raw_bytes_pil_array_and_hf_dicts(sample):
    d, img = sample
    raw = _png_bytes(img)
    assert _same(load_image(raw, 0), img)
    assert _same(load_image(bytearray(raw), 0), img)
    assert _same(load_image(img, 0), img)
    assert _same(load_image(np.asarray(img), 0), img)
    assert _same(load_image({"bytes": raw, "path": "ignored.png"}, 0), img)
    assert _same(load_image({"bytes": None, "path": "sub/a.png"}, 0, base_dir=d), img)


def test_http_url_from_a_local_server(sample):
    d, img = sample
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(d))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/sub/a.png"
        assert _same(load_image(url, 0, timeout=5), img)
        with pytest.raises(ImageLoadError, match=r"row 3: .*missing\.png.*HTTP Error 404"):
            load_image(url.replace("a.png", "missing.png"), 3, timeout=5, retries=2)
    finally:
        server.shutdown()
        server.server_close()


def test_unreachable_url_gives_clear_offline_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageLoadError, match=r"row 8: .*download failed after 2 attempt.*Offline\?"):
        load_image(f"http://127.0.0.1:{port}/x.png", 8, timeout=1, retries=1)


def test_missing_file_names_row_and_paths(tmp_path):
    with pytest.raises(ImageLoadError, match=r"row 2: cannot use image 'nope/x.png': file not found"):
        load_image("nope/x.png", 2, base_dir=tmp_path)


def test_long_base64_is_truncated_in_message():
    junk = base64.b64encode(b"not an image at all" * 200).decode()
    with pytest.raises(ImageLoadError) as exc:
        load_image(junk, 11)
    msg = str(exc.value)
    assert msg.startswith("row 11:") and f"<{len(junk)} chars>" in msg and len(msg) < 400


# ------------------------------------------------------------------------------------------- modes


def _rgba_half_transparent() -> Image.Image:
    img = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    for x in range(16):
        for y in range(32):
            img.putpixel((x, y), (0, 0, 255, 0))  # left half fully transparent
    return img


@pytest.mark.parametrize(
    "make, expect_left, expect_right",
    [
        (lambda: Image.new("L", (32, 32), 77), (77, 77, 77), (77, 77, 77)),
        (lambda: Image.new("1", (32, 32), 1), (255, 255, 255), (255, 255, 255)),
        (lambda: _rgba_half_transparent().convert("LA"), (255, 255, 255), (76, 76, 76)),
        (lambda: _rgba_half_transparent(), (255, 255, 255), (255, 0, 0)),
        (lambda: Image.new("CMYK", (32, 32), (0, 255, 255, 0)), (255, 0, 0), (255, 0, 0)),
        (lambda: Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)), (255, 255, 255), (255, 255, 255)),
        (lambda: Image.new("I", (32, 32), 128), (128, 128, 128), (128, 128, 128)),
        (lambda: Image.new("F", (32, 32), 0.5), (128, 128, 128), (128, 128, 128)),
    ],
    ids=["L", "1", "LA", "RGBA", "CMYK", "I;16", "I", "F"],
)
def test_modes_become_rgb_with_alpha_on_white(make, expect_left, expect_right):
    src = make()
    out = load_image(_png_bytes(src) if src.mode not in ("CMYK", "F", "I") else src, 0)
    assert out.mode == "RGB" and out.size == (32, 32)
    assert out.getpixel((2, 2)) == expect_left
    assert out.getpixel((30, 2)) == expect_right


def test_palette_with_transparency_composited_on_white():
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    for x in range(16):
        for y in range(32):
            p.putpixel((x, y), 0)
    p.info["transparency"] = 0  # palette index 0 is transparent
    out = load_image(_png_bytes(p, transparency=0), 0)
    assert out.mode == "RGB" and out.getpixel((2, 2)) == (255, 255, 255) and out.getpixel((30, 2)) == (200, 0, 0)


def test_palette_without_transparency():
    p = Image.new("P", (32, 32), 1)
    p.putpalette([0, 0, 0, 0, 120, 0] + [0] * 762)
    assert load_image(_png_bytes(p), 0).getpixel((5, 5)) == (0, 120, 0)


def test_exif_orientation_6_jpeg_is_upright():
    # Stored landscape 60x40 with a red top-left marker; orientation 6 = "rotate 90 CW to display".
    stored = Image.new("RGB", (60, 40), (255, 255, 255))
    for x in range(10):
        for y in range(10):
            stored.putpixel((x, y), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = load_image(_png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95), 0)
    assert out.size == (40, 60)  # displayed portrait
    r, g, b = out.getpixel((35, 4))  # the marker is now top-right
    assert r > 200 and g < 60 and b < 60


# ------------------------------------------------------------------------------------- pixel bounds


def test_max_pixels_downscales_keeping_aspect_ratio():
    out = load_image(Image.new("RGB", (8000, 4000)), 0, max_pixels=200 * 100)
    assert out.size[0] * out.size[1] <= 200 * 100
    assert abs(out.size[0] / out.size[1] - 2.0) < 0.05


def test_min_pixels_upscales_keeping_aspect_ratio():
    out = load_image(Image.new("RGB", (60, 30)), 0, min_pixels=240 * 120)
    assert out.size[0] * out.size[1] >= 240 * 120 and abs(out.size[0] / out.size[1] - 2.0) < 0.05


def test_max_pixels_that_would_shrink_below_min_side_raises():
    with pytest.raises(ImageLoadError, match=r"row 1: .*below the minimum side"):
        load_image(Image.new("RGB", (3000, 30)), 1, max_pixels=40 * 40)


# --------------------------------------------------------------------------------------- bad images


@pytest.mark.parametrize("size", [(27, 300), (1, 10000), (2, 2), (300, 27)])
def test_degenerate_sizes_raise_value_error_naming_row(size):
    with pytest.raises(ValueError, match=rf"row 6: .*{size[0]}x{size[1]}"):
        load_image(Image.new("RGB", size), 6, min_side=28)


def test_extreme_aspect_ratio_raises():
    with pytest.raises(ImageLoadError, match=r"row 0: .*aspect ratio 201"):
        load_image(Image.new("RGB", (28 * 201, 28)), 0)


def test_truncated_jpeg_raises(tmp_path):
    data = _png_bytes(Image.effect_noise((128, 128), 64).convert("RGB"), "JPEG")
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match=r"row 4: .*cut\.jpg.*truncated"):
        load_image(str(p), 4)
    with pytest.raises(ImageLoadError, match=r"row 4: .*corrupt"):
        load_image(data[: len(data) // 2], 4)


def test_zero_byte_file_and_empty_bytes_raise(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageLoadError, match=r"row 9: .*empty\.png.*empty file"):
        load_image(str(p), 9)
    with pytest.raises(ImageLoadError, match=r"row 9: .*empty"):
        load_image(b"", 9)


def test_not_an_image_raises(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello")
    with pytest.raises(ImageLoadError, match=r"row 5: .*notes\.png.*corrupt or unreadable"):
        load_image(str(p), 5)


def test_unsupported_reference_type():
    with pytest.raises(ImageLoadError, match=r"row 0: .*unsupported image reference type int"):
        load_image(12345, 0)


def test_messages_describe_values_not_object_reprs():
    # issue 17 item 7: PIL's "cannot identify image file <_io.BytesIO object at 0x...>" reached the check report
    with pytest.raises(ImageLoadError, match=r"row 2: cannot use image bytes \(12 B\): corrupt or unreadable") as e:
        load_image(b"not an image", 2)
    assert " object at 0x" not in str(e.value)
    with pytest.raises(ImageLoadError, match=r"row 2: cannot use image BytesIO: unsupported .* type BytesIO") as e:
        load_image(io.BytesIO(b"x"), 2)
    assert " object at 0x" not in str(e.value)
