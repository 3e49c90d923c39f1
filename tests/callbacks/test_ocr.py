"""OCRMetrics: hand-checked scores, and a real fit on the tiny Qwen2-VL + demo OCR set with CSV and
TensorBoard loggers, ModelCheckpoint(monitor="val/cer") and EarlyStopping reading the logged values."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from vlm_lightning.callbacks.ocr import OCRMetrics
from vlm_lightning.metrics.text import score_predictions


def test_max_rows_validated():
    with pytest.raises(ValueError, match="max_rows"):
        OCRMetrics(max_rows=0)


@pytest.fixture(scope="module")
def demo_paths(tmp_path_factory):
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    root = tmp_path_factory.mktemp("demo_ocr")
    paths = make_demo_ocr_dataset(root, n_train=4, n_val=6)
    # add a VQA-style `answers` column to the validation rows
    rows = [json.loads(line) for line in paths["val"].read_text().splitlines()]
    for r in rows:
        ref = r["messages"][-1]["content"][0]["text"]
        r["answers"] = [ref, ref, "0"]
    paths["val"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def _fit(tiny_vlm_dir, tmp_path, demo_paths, eval_for_generation: bool, max_rows):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.modules import VisionSFTModule

    base = str(tiny_vlm_dir("qwen2_vl"))
    module = VisionSFTModule(base, dtype="float32", r=4, gradient_checkpointing=False)
    dm = VisionChatDataModule(base, train=str(demo_paths["train"]), val=str(demo_paths["val"]), batch_size=2,
                              eval_for_generation=eval_for_generation)
    ocr = OCRMetrics(max_new_tokens=3, max_rows=max_rows, log_images=4)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/cer", mode="min", save_top_k=1)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, num_sanity_val_steps=1,
                        logger=loggers, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ocr, ckpt, EarlyStopping(monitor="val/cer", mode="min", patience=3)])
    torch.manual_seed(0)
    trainer.fit(module, datamodule=dm)
    return trainer, ocr, ckpt, loggers


@pytest.mark.parametrize("eval_for_generation", [False, True], ids=["datamodule_loader", "prompt_batches"])
def test_fit_logs_ocr_metrics(tiny_vlm_dir, tmp_path, demo_paths, eval_for_generation):
    max_rows = None if eval_for_generation else 5
    trainer, ocr, ckpt, loggers = _fit(tiny_vlm_dir, tmp_path, demo_paths, eval_for_generation, max_rows)
    n_rows = 6 if max_rows is None else max_rows

    for key in ("val/cer", "val/wer", "val/mer", "val/exact_match", "val/anls", "val/vqa_acc"):
        assert key in trainer.callback_metrics, key
    assert ckpt.best_model_path and ckpt.best_model_score is not None  # monitor="val/cer" found its value
    best = float(ckpt.best_model_score)
    assert best == pytest.approx(min(ocr.last_scores["val"]["cer"], best))

    # predictions jsonl: one line per scored row with prediction, reference and per-row CER
    lines = [json.loads(x) for x in ocr.last_predictions_file.read_text().splitlines()]
    assert len(lines) == n_rows
    # under the logger's folder, never the working directory
    assert ocr.last_predictions_file.parent == pathlib.Path(trainer.log_dir) / "predictions"
    assert ocr.last_predictions_file.resolve().is_relative_to(tmp_path.resolve())
    assert {"row_index", "prediction", "reference", "cer", "anls", "answers", "vqa_acc"} <= set(lines[0])
    recomputed = score_predictions([r["prediction"] for r in lines], [r["reference"] for r in lines],
                                   [r["answers"] for r in lines])
    for key, value in recomputed.items():
        assert ocr.last_scores["val"][key] == pytest.approx(value, abs=1e-6), key

    # CSV logger: a val/cer column with one value per epoch (the sanity check is not scored)
    csv_file = next((tmp_path / "csv").rglob("metrics.csv"))
    header, *rows = csv_file.read_text().splitlines()
    col = header.split(",").index("val/cer")
    assert sum(1 for r in rows if r.split(",")[col]) == 2

    # TensorBoard: scalars and the image grid
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(loggers[1].log_dir))
    ev.Reload()
    assert "val/cer" in ev.Tags()["scalars"]
    assert "val/ocr_samples" in ev.Tags()["images"]


def test_test_stage_scores(tiny_vlm_dir, tmp_path, demo_paths):
    import lightning as L

    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.modules import VisionSFTModule

    base = str(tiny_vlm_dir("qwen2_vl"))
    module = VisionSFTModule(base, dtype="float32", r=4, gradient_checkpointing=False)
    dm = VisionChatDataModule(base, train=str(demo_paths["train"]), test=str(demo_paths["val"]), batch_size=3)
    ocr = OCRMetrics(max_new_tokens=2, log_images=0, predictions_dir=str(tmp_path / "preds"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ocr])
    out = trainer.test(module, datamodule=dm)
    assert {"test/cer", "test/wer", "test/exact_match"} <= set(out[0])
    assert len(ocr.last_predictions_file.read_text().splitlines()) == 6
    assert ocr.last_predictions_file.parent == tmp_path / "preds"


def test_rows_without_datamodule(tiny_vlm_dir, tmp_path, demo_paths):
    """Validation from a plain DataLoader (teacher-forced batches): the callback scores the rows it was given."""
    import lightning as L
    from torch.utils.data import DataLoader

    from vlm_lightning.data import VisionChatCollator, normalize_rows
    from vlm_lightning.modules import VisionSFTModule

    base = str(tiny_vlm_dir("qwen2_vl"))
    module = VisionSFTModule(base, dtype="float32", r=4, gradient_checkpointing=False)
    module.configure_model()
    raw = [json.loads(x) for x in demo_paths["val"].read_text().splitlines()][:3]
    rows = normalize_rows(raw)
    collate = VisionChatCollator(module.processor, base_dir=str(demo_paths["val"].parent))
    loader = DataLoader(rows, batch_size=3, collate_fn=collate)
    ocr = OCRMetrics(max_new_tokens=2, rows=rows, batch_size=2, image_base_dir=str(demo_paths["val"].parent),
                     predictions_dir=str(tmp_path))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ocr])
    out = trainer.validate(module, dataloaders=loader)
    assert {"val/loss", "val/cer", "val/vqa_acc"} <= set(out[0])  # teacher-forced loss and generated scores
    lines = [json.loads(x) for x in ocr.last_predictions_file.read_text().splitlines()]
    assert [r["row_index"] for r in lines] == [0, 1, 2]
    assert [r["reference"] for r in lines] == [r["messages"][-1]["content"][0]["text"] for r in raw]
