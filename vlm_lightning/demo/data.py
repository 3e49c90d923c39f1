"""The demo's data: a tiny synthetic OCR set, generated deterministically (digit strings rendered into
small images), and ``DemoOCRData``, the recipe block (``demo_data:``) that asks the CLI to write it.

Train and validation use disjoint strings (and their own layouts), so a model that scores on val has
learned to read rather than memorised. The prompt never contains the answer. Images are 112x56 RGB
PNGs (8 Qwen-VL tokens each), written next to ``train.jsonl`` / ``val.jsonl`` in the messages format
with paths relative to the jsonl files. Left out: any real OCR data (point ``data.train`` at yours).

Run: ``python -m vlm_lightning.demo.data /tmp/demo_ocr`` prints the two jsonl paths.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PROMPT = "What number is written in the image? Answer with the digits only."
IMAGE_SIZE = (112, 56)
FIXED_FONT_SIZE = 34  # the font size of layout="fixed" (the SFT demo's task)
_VERSION = 1  # bump when the rendering changes, so stale folders are rebuilt


def _font(size: int) -> ImageFont.ImageFont:
    try:  # Pillow >= 10.1 with FreeType ships a scalable default font (Aileron)
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: fixed-size bitmap font
        return ImageFont.load_default()


def render_digits(text: str, rng: random.Random, size: tuple[int, int] = IMAGE_SIZE,
                  layout: str = "random", font_size: int = FIXED_FONT_SIZE, noise: float = 0.0) -> Image.Image:
    """Draw ``text`` in dark ink on a light background. ``layout="random"``: random font size and position
    from ``rng``; ``"fixed"``: one font size (``font_size``), centred, with a jitter of a few pixels (the CPU
    demo's task). ``noise``: standard deviation of Gaussian noise added to every pixel (0-255 scale), drawn
    from ``rng`` too."""
    w, h = size
    bg = tuple(rng.randint(215, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    font = _font(rng.randint(22, 30) if layout == "random" else font_size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left, bottom - top
    if layout == "random":
        x = rng.randint(2, max(2, w - tw - 2)) - left
        y = rng.randint(2, max(2, h - th - 2)) - top
    else:
        x = (w - tw) // 2 + rng.randint(-3, 3) - left
        y = (h - th) // 2 + rng.randint(-3, 3) - top
    draw.text((x, y), text, fill=ink, font=font)
    if noise > 0:
        pixels = np.asarray(img, dtype=np.float32)
        pixels += np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise, pixels.shape)
        img = Image.fromarray(pixels.clip(0, 255).round().astype(np.uint8))
    return img


def _strings(n: int, rng: random.Random, exclude: set[str]) -> list[str]:
    out: list[str] = []
    seen = set(exclude)
    while len(out) < n:
        s = str(rng.randint(0, 10 ** rng.randint(2, 4) - 1)).zfill(rng.randint(2, 4))
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_demo_ocr_dataset(root: str | Path, n_train: int = 64, n_val: int = 16, seed: int = 0,
                          num_digits: int | None = None, layout: str = "random", prompt: str = PROMPT,
                          image_last: bool = False, font_size: int = FIXED_FONT_SIZE,
                          noise: float = 0.0) -> dict[str, Path]:
    """Write (once) and return ``{"train": root/train.jsonl, "val": root/val.jsonl}``.

    Deterministic for a given ``(n_train, n_val, seed, num_digits, layout, prompt, image_last, font_size, noise)``;
    a folder made with the same settings is reused. Train and val strings are disjoint.

    ``num_digits=None`` draws strings of 2-4 digits, each string used once. ``num_digits=k`` uses the 10**k
    strings of exactly k digits: ``n_val`` of them are held out for validation, and the ``n_train`` training
    images are drawn (with repeats, each rendered afresh) from the rest, so validation measures reading
    digit by digit, never a memorised string or image.

    ``prompt`` is the user's question (it never holds the answer); ``image_last=True`` puts the image after
    it, right before the answer (the CPU demo: "Read." then the image).

    ``font_size`` (layout "fixed") and ``noise`` (pixel noise std) shift the rendering away from the SFT demo's
    task for the GRPO demo (``recipes/demo/grpo_cpu.yaml``). With the same ``seed``, ``num_digits`` and
    ``n_val`` the validation strings are the same whatever the rendering, so a shifted set's validation strings
    are also held out of the SFT demo's training.

    Example:
        >>> paths = make_demo_ocr_dataset("/tmp/demo_ocr", n_train=32, n_val=8)
        >>> dm = VisionChatDataModule("path/to/model", train=paths["train"], val=paths["val"])
    """
    root = Path(root)
    paths = {"train": root / "train.jsonl", "val": root / "val.jsonl"}
    stamp = root / "demo_ocr.json"
    if layout not in ("random", "fixed"):
        raise ValueError(f"layout={layout!r}: use 'random' or 'fixed'")
    settings = {"version": _VERSION, "n_train": n_train, "n_val": n_val, "seed": seed}
    if num_digits is not None or layout != "random":
        settings.update(num_digits=num_digits, layout=layout)
    if prompt != PROMPT or image_last:
        settings.update(prompt=prompt, image_last=image_last)
    if font_size != FIXED_FONT_SIZE or noise:
        settings.update(font_size=font_size, noise=noise)
    if stamp.exists() and all(p.exists() for p in paths.values()):
        try:
            if json.loads(stamp.read_text()) == settings:
                return paths
        except json.JSONDecodeError:
            pass
    rng = random.Random(seed)
    if num_digits is None:
        train_strings = _strings(n_train, rng, set())
        val_strings = _strings(n_val, rng, set(train_strings))
    else:
        pool = [str(i).zfill(num_digits) for i in range(10 ** num_digits)]
        if n_val >= len(pool):
            raise ValueError(f"n_val={n_val} leaves no {num_digits}-digit string for training")
        rng.shuffle(pool)
        val_strings, rest = pool[:n_val], pool[n_val:]
        train_strings = [rng.choice(rest) for _ in range(n_train)]
    for split, strings in (("train", train_strings), ("val", val_strings)):
        (root / split).mkdir(parents=True, exist_ok=True)
        split_rng = random.Random(f"{seed}-{split}")
        with paths[split].open("w", encoding="utf-8") as f:
            for i, s in enumerate(strings):
                rel = f"{split}/{i:05d}.png"
                render_digits(s, split_rng, layout=layout, font_size=font_size, noise=noise).save(root / rel)
                user = [{"type": "image", "image": rel}, {"type": "text", "text": prompt}]
                row = {
                    "messages": [
                        {"role": "user", "content": user[::-1] if image_last else user},
                        {"role": "assistant", "content": [{"type": "text", "text": s}]},
                    ]
                }
                f.write(json.dumps(row) + "\n")
    stamp.write_text(json.dumps(settings))
    return paths


@dataclass
class DemoOCRData:
    """The bundled synthetic OCR set (``make_demo_ocr_dataset``), written on first use into ``root`` as
    ``train.jsonl`` / ``val.jsonl`` (validation strings never appear in training). The CLI's ``--demo_data``
    option (a recipe's ``demo_data:`` block) takes it and calls ``write_demo_data`` before anything is built."""

    root: str = "runs/demo/data"
    n_train: int = 2000
    n_val: int = 64
    seed: int = 0
    num_digits: int | None = None
    layout: str = "random"
    prompt: str = PROMPT
    image_last: bool = False
    font_size: int = FIXED_FONT_SIZE
    noise: float = 0.0


def write_demo_data(settings: DemoOCRData | Any) -> dict[str, Path]:
    """``make_demo_ocr_dataset`` with the fields of a ``DemoOCRData`` (or of the CLI's parsed namespace of one).

    Example:
        >>> write_demo_data(DemoOCRData(root="/tmp/demo_ocr", n_train=32, n_val=8))["train"]
        PosixPath('/tmp/demo_ocr/train.jsonl')
    """
    return make_demo_ocr_dataset(settings.root, n_train=settings.n_train, n_val=settings.n_val, seed=settings.seed,
                                 num_digits=settings.num_digits, layout=settings.layout, prompt=settings.prompt,
                                 image_last=settings.image_last,
                                 font_size=getattr(settings, "font_size", FIXED_FONT_SIZE),
                                 noise=getattr(settings, "noise", 0.0))


if __name__ == "__main__":  # pragma: no cover
    out = make_demo_ocr_dataset(sys.argv[1] if len(sys.argv) > 1 else "demo_ocr")
    print(json.dumps({k: str(v) for k, v in out.items()}))
