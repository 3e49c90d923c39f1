"""VisionChatDataModule: sources, splits, the check report, bad-row skipping, pixel bounds, demo set."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_lightning.data import DataCheckReport, VisionChatDataModule
from vlm_lightning.demo.data import PROMPT, make_demo_ocr_dataset


@pytest.fixture(scope="module")
def qwen_dir(tiny_vlm_dir) -> str:
    return str(tiny_vlm_dir("qwen2_vl"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return make_demo_ocr_dataset(tmp_path_factory.mktemp("demo"), n_train=12, n_val=4)


def _png(path: Path, size=(64, 32), color=(20, 20, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _rows(n: int, image_dir: Path) -> list[dict]:
    return [{"image": str(_png(image_dir / f"{i}.png")), "text": f"{i:03d}"} for i in range(n)]


# -------------------------------------------------------------------------------------------- sources


def test_python_lists_with_processor_and_forward(qwen_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(qwen_dir)
    rows = _rows(3, tmp_path)
    rows.append({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]})
    dm = VisionChatDataModule(processor=processor, train=rows, val=rows[:2], batch_size=4,
                              instruction="Transcribe.")
    dm.setup("fit")
    assert dm.processor is processor
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["image_grid_thw"].shape[0] == 3
    model = AutoModelForImageTextToText.from_pretrained(qwen_dir)
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
    assert len(next(iter(dm.val_dataloader()))["input_ids"]) == 2


def test_jsonl_relative_paths_val_fraction_split_is_seeded(qwen_dir, demo):
    def split(seed):
        dm = VisionChatDataModule(qwen_dir, train=str(demo["train"]), val_fraction=0.25, seed=seed)
        dm.setup("fit")
        return dm.datasets["train"].indices, dm.datasets["val"].indices

    train, val = split(0)
    assert len(val) == 3 and len(train) == 9 and not set(train) & set(val)
    assert split(0) == (train, val) and split(1) != (train, val)


def test_shuffle_is_seeded(qwen_dir, demo):
    def order(seed):
        dm = VisionChatDataModule(qwen_dir, train=str(demo["train"]), batch_size=12, seed=seed)
        dm.setup("fit")
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(3))


def test_json_parquet_and_imagefolder_sources(qwen_dir, tmp_path):
    import datasets

    rows = _rows(2, tmp_path / "json_imgs")
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (1, 2, 3)).save(buf, format="PNG")
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": buf.getvalue(), "path": None}] * 2, "question": ["Q1", "Q2"], "answer": ["A1", "A2"]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "answer": datasets.Value("string")}),
    )
    ds.to_parquet(str(tmp_path / "vqa.parquet"))
    folder = tmp_path / "folder"
    for i in range(2):
        _png(folder / f"img{i}.png")
    with (folder / "metadata.jsonl").open("w") as f:
        for i in range(2):
            f.write(json.dumps({"file_name": f"img{i}.png", "text": f"T{i}"}) + "\n")

    dm = VisionChatDataModule(qwen_dir, train=str(tmp_path / "rows.json"), val=str(tmp_path / "vqa.parquet"),
                              test=str(folder), batch_size=2)
    dm.setup()
    assert [len(dm.datasets[s]) for s in ("train", "val", "test")] == [2, 2, 2]
    assert dm.datasets["val"][1]["answers"] == ["A2"]
    assert dm.datasets["test"][0]["messages"][1]["content"][0]["text"] in ("T0", "T1")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batch = next(iter(loader))
        assert batch["image_grid_thw"].shape[0] == 2 and (batch["labels"] != -100).any()


def test_hub_id_offline_gives_clear_error(qwen_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dm = VisionChatDataModule(qwen_dir, train="someone/some-vqa-set")
    with pytest.raises(FileNotFoundError, match="someone/some-vqa-set.*offline"):
        dm.setup()


def test_needs_model_or_processor():
    with pytest.raises(ValueError, match="model_name_or_path"):
        VisionChatDataModule(train=[])


# ---------------------------------------------------------------------------------------- check/skip


def _mixed_rows(tmp_path: Path) -> list[dict]:
    good = _rows(2, tmp_path / "good")
    degenerate = {"image": str(_png(tmp_path / "thin.png", size=(27, 300))), "text": "x"}
    truncated = tmp_path / "cut.jpg"
    b = io.BytesIO()
    Image.effect_noise((96, 96), 50).convert("RGB").save(b, format="JPEG")
    truncated.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    big = {"image": str(_png(tmp_path / "big.png", size=(448, 448))), "text": "long"}
    return good + [
        degenerate,                                    # 2
        {"image": str(truncated), "text": "x"},        # 3
        {"image": str(empty), "text": "x"},            # 4
        {"image": str(tmp_path / "nope.png"), "text": "x"},  # 5
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "a"}]},  # 6
        big,                                           # 7: image span exceeds max_length
    ]


def test_check_report_lists_every_bad_row(qwen_dir, tmp_path, capsys):
    dm = VisionChatDataModule(qwen_dir, train=_mixed_rows(tmp_path), max_length=60, validate=False,
                              on_bad_example="skip")
    dm.setup()  # without validation only the format error (row 6) is dropped here
    assert dm.num_skipped["train"] == 1
    capsys.readouterr()
    report = dm.check()
    printed = capsys.readouterr().out
    assert isinstance(report, DataCheckReport) and not report.ok
    tr = report.splits["train"]
    assert (tr.rows, tr.ok, tr.overlong, tr.image_token_mismatches) == (7, 2, 1, 0)
    assert report.bad_indices["train"] == [2, 3, 4, 5, 7]
    assert "PROBLEMS FOUND" in printed and "train: 7 rows, 2 ok, 5 bad" in printed
    assert "row 3:" in printed and "truncated" in printed


def test_on_bad_example_skip_counts_and_logs(qwen_dir, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    dm = VisionChatDataModule(qwen_dir, train=_mixed_rows(tmp_path), val=_rows(2, tmp_path / "v"),
                              max_length=60, on_bad_example="skip", batch_size=8)
    trainer = L.Trainer(logger=CSVLogger(tmp_path / "logs"), accelerator="cpu", enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    dm.trainer = trainer
    dm.setup("fit")
    assert dm.num_skipped == {"train": 6, "val": 0}
    assert sorted(dm.datasets["train"].indices) == [0, 1]
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2
    trainer.logger.save()
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    assert float(metrics[0]["data/skipped_train"]) == 6.0


def test_on_bad_example_raise_names_the_row(qwen_dir, tmp_path):
    rows = _rows(1, tmp_path) + [{"image": str(tmp_path / "nope.png"), "text": "x"}]
    with pytest.raises(ValueError, match=r"row 1: .*file not found"):
        VisionChatDataModule(qwen_dir, train=rows, validate=True).setup()
    bad_format = _rows(1, tmp_path) + [{"foo": 1}]
    with pytest.raises(ValueError, match=r"train split: row 1: cannot detect the format"):
        VisionChatDataModule(qwen_dir, train=bad_format).setup()


def test_split_with_every_row_skipped_raises_naming_split_and_counts(qwen_dir, tmp_path):
    # issue 17 item 2: used to print "rows train=0" and fail later in torch ("num_samples should be a positive
    # integer value"), while an all-bad val split silently yielded 0 batches
    bad = [{"image": str(tmp_path / "nope.png"), "text": "x"}, {"foo": 1}]
    with pytest.raises(ValueError, match=r"train split has no rows left: 2 of 2 rows skipped \(2 bad\)"):
        VisionChatDataModule(qwen_dir, train=bad, on_bad_example="skip").setup("fit")
    with pytest.raises(ValueError, match=r"train split has no rows left: 2 of 2 rows skipped \(2 bad\)"):
        VisionChatDataModule(qwen_dir, train=[{"foo": 1}, {"bar": 2}], on_bad_example="skip", validate=False).setup()
    dm = VisionChatDataModule(qwen_dir, train=_rows(2, tmp_path), val=bad, on_bad_example="skip")
    with pytest.raises(ValueError, match=r"val split has no rows left: 2 of 2 rows skipped"):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"train split has no rows: its source holds none"):
        VisionChatDataModule(qwen_dir, train=[]).setup("fit")


def test_eval_split_empty_in_its_source_warns_in_its_loader(qwen_dir, tmp_path, caplog):
    # val_fraction of a one-row train set leaves no val row: legitimate, so a warning rather than an error
    dm = VisionChatDataModule(qwen_dir, train=_rows(1, tmp_path), val_fraction=0.5)
    dm.setup("fit")
    with caplog.at_level("WARNING"):
        assert len(dm.val_dataloader()) == 0
    assert "val split has 0 rows" in caplog.text


def _answers(tmp_path: Path, answers: list[str]) -> list[dict]:
    return [{"image": str(_png(tmp_path / f"{i}.png")), "text": a} for i, a in enumerate(answers)]


def test_on_empty_answer_raise_skip_keep(qwen_dir, tmp_path):
    # issue 17 item 5: an empty answer ("") supervises only the end-of-turn token; the default refuses it
    rows = _answers(tmp_path, ["12", "", "7"])
    for validate in (False, True):
        with pytest.raises(ValueError, match=r"train split: row 1: empty assistant answer.*on_empty_answer"):
            VisionChatDataModule(qwen_dir, train=rows, validate=validate).setup()
    dm = VisionChatDataModule(qwen_dir, train=rows, on_empty_answer="skip")
    dm.setup()
    assert dm.datasets["train"].indices == [0, 2] and dm.num_skipped == {"train": 1}
    dm = VisionChatDataModule(qwen_dir, train=rows, on_empty_answer="keep", on_bad_example="skip")
    dm.setup()
    assert dm.datasets["train"].indices == [0, 1, 2] and dm.num_skipped == {"train": 0}
    # prompt-only splits (GRPO, generation eval) never train on the answer: an empty reference is no error
    dm = VisionChatDataModule(qwen_dir, train=rows, val=rows, train_for_generation=True, eval_for_generation=True)
    dm.setup()
    assert len(dm.datasets["train"]) == 3 and len(dm.datasets["val"]) == 3
    with pytest.raises(ValueError, match="on_empty_answer"):
        VisionChatDataModule(qwen_dir, train=rows, on_empty_answer="drop")


def test_malformed_jsonl_line_skipped_and_counted_in_the_split(qwen_dir, tmp_path):
    # issue 17 item 6 at the data module: the broken line counts as a skipped row of its split
    p = tmp_path / "train.jsonl"
    good = _rows(2, tmp_path)
    p.write_text(json.dumps(good[0]) + "\n{broken\n" + json.dumps(good[1]) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl: line 2: invalid JSON"):
        VisionChatDataModule(qwen_dir, train=str(p)).setup()
    dm = VisionChatDataModule(qwen_dir, train=str(p), on_bad_example="skip")
    dm.setup()
    assert len(dm.datasets["train"]) == 2 and dm.num_skipped == {"train": 1}


# ----------------------------------------------------------------------------------------- pixels


def test_max_pixels_configures_processor_and_bounds_tokens(qwen_dir, tmp_path):
    max_pixels = 28 * 28 * 16
    huge = {"image": Image.new("RGB", (8000, 8000), (9, 9, 9)), "text": "x"}
    dm = VisionChatDataModule(qwen_dir, train=[huge], max_pixels=max_pixels)
    dm.setup()
    assert dm.processor.image_processor.size["longest_edge"] == max_pixels
    enc = dm.collator().encode_row(dm.datasets["train"][0])
    assert 0 < enc.num_image_tokens <= max_pixels // (28 * 28)
    assert enc.num_image_tokens == enc.expected_image_tokens


# -------------------------------------------------------------------------------------------- demo


def test_demo_dataset_is_deterministic_disjoint_and_leak_free(qwen_dir, tmp_path):
    a = make_demo_ocr_dataset(tmp_path / "a", n_train=10, n_val=5, seed=3)
    b = make_demo_ocr_dataset(tmp_path / "b", n_train=10, n_val=5, seed=3)

    def digest(paths):
        h = hashlib.sha256()
        for split in ("train", "val"):
            h.update(paths[split].read_bytes())
            for p in sorted((paths[split].parent / split).glob("*.png")):
                h.update(p.read_bytes())
        return h.hexdigest()

    assert digest(a) == digest(b)
    answers = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in a[split].read_text().splitlines()]
        answers[split] = [r["messages"][1]["content"][0]["text"] for r in rows]
        for r, ans in zip(rows, answers[split]):
            user = r["messages"][0]["content"]
            assert user[1]["text"] == PROMPT and ans not in PROMPT and ans.isdigit() and 2 <= len(ans) <= 4
            img = Image.open(a[split].parent / user[0]["image"])
            assert img.size == (112, 56) and img.mode == "RGB"
    assert len(answers["train"]) == 10 and len(answers["val"]) == 5
    assert not set(answers["train"]) & set(answers["val"])

    dm = VisionChatDataModule(qwen_dir, train=str(a["train"]), val=str(a["val"]), eval_for_generation=True,
                              batch_size=5)
    dm.setup()
    assert dm.check(verbose=False).ok
    gen = next(iter(dm.val_dataloader()))
    assert gen["references"] == answers["val"] and "labels" not in gen
