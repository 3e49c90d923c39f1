"""Fetch the bytes of one http(s) image URL within bounds: a timeout per attempt, one retry, a size cap read
before any decoding, and a per-split ``FetchBudget`` of time that failing servers may cost.

Only ``http`` and ``https`` are fetched here, and redirects may lead only to those (a row cannot read local
files or other services through a URL). What it leaves out: decoding, ``data:`` URIs and local paths
(``images.py``, which turns a :class:`FetchError` into a row-naming ``ImageLoadError``).

Example:
    >>> budget = FetchBudget(120.0)  # one per split
    >>> data = fetch_url("https://example.org/a.png", timeout=10.0, max_bytes=MAX_IMAGE_BYTES, budget=budget)
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

MAX_IMAGE_BYTES = 50 * 2**20  # default size cap of one fetched or inline image
FETCH_SCHEMES = ("http", "https")


class FetchError(Exception):
    """A URL that gave no image bytes; ``timed_out`` when its last attempt timed out."""

    def __init__(self, message: str, timed_out: bool = False):
        super().__init__(message)
        self.timed_out = timed_out


@dataclass
class FetchBudget:
    """Seconds one split may lose to failing URL fetches (timeouts, refused connections, server errors, and the
    pauses between attempts); successful downloads cost nothing. Once spent, its further URLs fail at once.
    Each DataLoader worker process keeps its own copy."""

    total_s: float
    spent_s: float = 0.0

    @property
    def left_s(self) -> float:
        return max(0.0, self.total_s - self.spent_s)

    def spend(self, seconds: float) -> None:
        self.spent_s += seconds


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) (urllib's default also follows ``ftp://``)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in FETCH_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a refused URL scheme {scheme!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def fetch_url(url: str, timeout: float = 10.0, retries: int = 1, max_bytes: int | None = MAX_IMAGE_BYTES,
              budget: FetchBudget | None = None) -> bytes:
    """The body of ``url`` (http/https), tried ``retries + 1`` times with ``timeout`` seconds per connect or read
    (cut to what is left of ``budget``). Raises :class:`FetchError` for a refused scheme, a body over
    ``max_bytes`` (by its Content-Length, or by reading at most ``max_bytes + 1`` bytes), a client error (no
    retry) or when every attempt failed."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in FETCH_SCHEMES:
        raise FetchError(f"URL scheme {scheme!r} refused: only http, https and data: URIs are fetched")
    last: Exception | None = None
    attempts = 0
    for attempt in range(retries + 1):
        wait = timeout if budget is None else min(timeout, budget.left_s)
        if wait <= 0:
            break
        attempts += 1
        start = time.monotonic()
        try:
            return _read_capped(url, wait, max_bytes)
        except urllib.error.HTTPError as e:
            last = e
            if e.code < 500 and e.code != 429:  # client errors will not fix themselves
                _spend(budget, start)
                break
        except (urllib.error.URLError, OSError) as e:  # TimeoutError is an OSError
            last = e
        if attempt < retries:
            time.sleep(0.5 * 2**attempt if budget is None else min(0.5 * 2**attempt, budget.left_s))
        _spend(budget, start)
    spent = budget is not None and budget.left_s <= 0
    spent_note = (f"the fetch budget of {budget.total_s:g}s for this split is spent (image_fetch_budget_s): "
                  "its further URLs fail at once") if spent else ""
    if last is None:
        raise FetchError(f"not fetched: {spent_note or f'no time to try (timeout {timeout:g}s)'}")
    timed_out = _is_timeout(last)
    if isinstance(last, urllib.error.HTTPError):
        reason = f"HTTP Error {last.code} {last.reason}"
    else:
        reason = "timed out" if timed_out else getattr(last, "reason", last)
    raise FetchError(
        f"download failed after {attempts} attempt(s) (timeout {timeout:g}s): {reason}. "
        "Offline? Download the images and point the dataset at local paths." + (f" Now {spent_note}." if spent else ""),
        timed_out=timed_out,
    )


def _read_capped(url: str, timeout: float, max_bytes: int | None) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "vlm-lightning/0.1"})
    with _OPENER.open(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length", "")
        if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
            raise FetchError(f"Content-Length {int(length)} B exceeds max_image_bytes={max_bytes}")
        data = resp.read() if max_bytes is None else resp.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise FetchError(f"the body holds more than max_image_bytes={max_bytes} B")
    return data


def _spend(budget: FetchBudget | None, start: float) -> None:
    if budget is not None:
        budget.spend(time.monotonic() - start)


def _is_timeout(err: Exception) -> bool:
    return isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
