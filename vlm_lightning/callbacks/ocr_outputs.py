"""What ``OCRMetrics`` leaves behind after scoring: the predictions file and a TensorBoard image grid.

Rank zero calls these with every rank's rows already gathered. Left out: the scoring itself
(``callbacks/ocr.py`` with ``vlm_lightning.metrics.text``).

Example:
    >>> path = write_predictions(Path("runs/ocr/predictions"), "val", epoch=0, step=100, rows=rows)
    >>> log_sample_grid(trainer, "val", [(image, "12", "13")])   # TensorBoard loggers only
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw

__all__ = ["log_sample_grid", "tile_grid", "write_predictions"]


def write_predictions(directory: Path, stage: str, epoch: int, step: int, rows: list[dict]) -> Path:
    """``<directory>/<stage>_epoch<E>_step<S>.jsonl``: one prediction row per line, sorted by row index."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stage}_epoch{epoch:03d}_step{step:06d}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for row in sorted(rows, key=lambda r: r["row_index"]):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def log_sample_grid(trainer: Any, stage: str, tiles: list[tuple[Any, str, str]]) -> None:
    """Log ``(image, prediction, reference)`` tiles as one image, ``<stage>/ocr_samples``, to every
    TensorBoard logger of the trainer (nothing without one)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not tiles or not loggers:
        return
    grid = np.asarray(tile_grid(tiles))
    for lg in loggers:
        lg.experiment.add_image(f"{stage}/ocr_samples", grid, global_step=trainer.global_step, dataformats="HWC")


def tile_grid(tiles: list, tile: int = 192, text_h: int = 44, cols: int = 4) -> Image.Image:
    """A PIL grid: each tile is the image (fit into tile x tile) with 'P: prediction' / 'R: reference' below."""
    rows_n = (len(tiles) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * tile, rows_n * (tile + text_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, (img, pred, ref) in enumerate(tiles):
        x, y = (k % cols) * tile, (k // cols) * (tile + text_h)
        if isinstance(img, Image.Image):
            im = img.convert("RGB")
            im.thumbnail((tile, tile))
            canvas.paste(im, (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
        draw.text((x + 4, y + tile + 4), f"P: {pred[:28]}", fill=(200, 0, 0))
        draw.text((x + 4, y + tile + 22), f"R: {ref[:28]}", fill=(0, 120, 0))
    return canvas
