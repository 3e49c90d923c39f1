"""Image URLs stay bounded and safe (issue 17 item 4 and Deliver 5): a timeout per attempt, one retry, a per-split
budget of time lost to failing servers, timeouts counted in skip mode, only http/https/data schemes, a size cap
checked before decoding, and PIL's decompression-bomb limit as a per-row error. Local servers only, no internet."""

from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
import warnings

import pytest
from PIL import Image

from vlm_lightning.data import VisionChatDataModule
from vlm_lightning.data.fetch import FetchBudget
from vlm_lightning.data.images import ImageFetchTimeout, ImageLoadError, load_image


def _png(size=(64, 40)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def hung_server():
    """A server that accepts connections and never answers (a hung image host); yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.settimeout(0.05)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:  # the accept timeout: look at stop again
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


@pytest.fixture
def png_server():
    """Serves ``/a.png`` with a Content-Length and ``/stream.png`` without one (read until close)."""
    data = _png()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            if self.path == "/a.png":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data
    server.shutdown()
    server.server_close()


# -------------------------------------------------------------------------------- item 4: bounded fetches


def test_hung_server_times_out_after_two_attempts(hung_server):
    # issue 17 item 4: three attempts of the default 10 s (plus backoff) cost 31.5 s per image
    start = time.monotonic()
    with pytest.raises(ImageFetchTimeout, match=r"row 4: .*download failed after 2 attempt\(s\) \(timeout 0.3s\)"):
        load_image(hung_server + "/a.png", 4, timeout=0.3)
    assert time.monotonic() - start < 0.3 * 2 + 0.5 + 1.0  # two attempts and one backoff pause, plus slack


def test_fetch_budget_bounds_the_time_a_split_loses(hung_server):
    budget = FetchBudget(1.0)
    start = time.monotonic()
    errors = []
    for i in range(5):
        with pytest.raises(ImageLoadError) as e:
            load_image(f"{hung_server}/{i}.png", i, timeout=0.3, budget=budget)
        errors.append(str(e.value))
    assert time.monotonic() - start < 1.0 + 1.0  # the budget, plus slack
    assert budget.left_s == 0.0
    assert "row 4: " in errors[-1] and "fetch budget of 1s for this split is spent" in errors[-1]


def test_datamodule_timeout_option_and_skip_mode_counts_timeouts(tiny_vlm_dir, hung_server, tmp_path, caplog):
    good = tmp_path / "ok.png"
    good.write_bytes(_png())
    rows = [{"image": str(good), "text": "1"}] + [{"image": f"{hung_server}/{i}.png", "text": "2"} for i in range(2)]
    dm = VisionChatDataModule(str(tiny_vlm_dir("qwen2_vl")), train=rows, on_bad_example="skip",
                              image_timeout_s=0.2, image_fetch_budget_s=30.0)
    assert dm.collator().image_timeout_s == 0.2
    start = time.monotonic()
    dm.setup("fit")
    assert time.monotonic() - start < 10.0  # was 63.6 s for two such rows
    assert dm.num_skipped == {"train": 2} and dm.report.splits["train"].timeouts == 2
    assert "URL timeouts 2" in str(dm.report) and "(image URL timeouts: {'train': 2})" in caplog.text
    collator = dm.collator()
    row = {"index": 1, "messages": [{"role": "user", "content": [{"type": "image", "image": f"{hung_server}/x.png"}]},
                                    {"role": "assistant", "content": [{"type": "text", "text": "2"}]}]}
    assert collator([row]) is None  # skip mode mid-epoch: dropped and counted as a timeout
    assert (collator.num_skipped, collator.num_timeouts) == (1, 1)


# ------------------------------------------------------------------------------------ Deliver 5: safety


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/a.png", "gopher://127.0.0.1/a"])
def test_only_http_https_and_data_schemes(url):
    scheme = url.split(":")[0]
    with pytest.raises(ImageLoadError, match=rf"row 3: .*URL scheme '{scheme}' refused: only http, https and data"):
        load_image(url, 3)


def test_file_url_to_an_existing_image_is_refused(tmp_path):
    p = tmp_path / "a.png"
    p.write_bytes(_png())
    with pytest.raises(ImageLoadError, match=r"row 0: .*URL scheme 'file' refused"):
        load_image(p.as_uri(), 0)
    assert load_image(str(p), 0).size == (64, 40)  # the same file as a path loads


def test_size_cap_before_decoding(png_server):
    base, data = png_server
    assert load_image(base + "/a.png", 0, timeout=5).size == (64, 40)
    assert load_image(base + "/stream.png", 0, timeout=5).size == (64, 40)
    cap = len(data) - 1
    with pytest.raises(ImageLoadError, match=rf"row 1: .*Content-Length {len(data)} B exceeds max_image_bytes={cap}"):
        load_image(base + "/a.png", 1, timeout=5, max_bytes=cap)
    with pytest.raises(ImageLoadError, match=rf"row 2: .*more than max_image_bytes={cap} B"):
        load_image(base + "/stream.png", 2, timeout=5, max_bytes=cap)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with pytest.raises(ImageLoadError, match=rf"row 3: .*{len(data)} B exceeds max_image_bytes={cap}"):
        load_image(uri, 3, max_bytes=cap)


def test_decompression_bomb_is_a_row_error_not_a_warning(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for size, pixels in (((40, 40), 1600), ((64, 64), 4096)):  # PIL warns over the limit, raises over twice it
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with pytest.raises(ImageLoadError, match=rf"row 7: .*{pixels} pixels exceed.*MAX_IMAGE_PIXELS=1000"):
                load_image(_png(size), 7)
