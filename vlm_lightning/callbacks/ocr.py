"""`OCRMetrics`: generate answers for the validation (and test) rows and score them like an OCR / VQA
benchmark: CER, WER, MER (torchmetrics), exact match, ANLS (DocVQA) and VQA accuracy, logged as `val/cer`,
`val/wer`, `val/mer`, `val/exact_match`, `val/anls`, `val/vqa_acc` so
`ModelCheckpoint(monitor="val/cer", mode="min")` and `EarlyStopping` can use them.

Where the prompts come from, first match wins:
1. validation batches that are already prompt-only (`VisionChatDataModule(eval_for_generation=True)`):
   scored as they pass, sharded across ranks by Lightning;
2. otherwise `trainer.datamodule.generation_dataloader(split)` at epoch end (batches dealt round-robin
   to the ranks);
3. otherwise the `rows=` given to the callback, collated with `VisionChatCollator(processor, for_generation=True)`.

The text metrics are `vlm_lightning.metrics.text`'s; model calls go through `distributed.gather.run_unsharded`
(FSDP / ZeRO-3 safe); the predictions file and the TensorBoard grid are written by `ocr_outputs.py`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback
from torchmetrics import MeanMetric
from torchmetrics.text import CharErrorRate, MatchErrorRate, WordErrorRate

from ..data import VisionChatCollator
from ..distributed.checks import shards_parameters
from ..distributed.gather import all_gather_objects, run_unsharded
from ..metrics.text import TextNormalizer, anls, cer, vqa_accuracy
from .ocr_outputs import log_sample_grid, write_predictions

__all__ = ["OCRMetrics"]


class _StageScores:
    """Metric states for one stage; torchmetrics' compute() all-reduces them across ranks."""

    def __init__(self, device: torch.device):
        self.cer = CharErrorRate().to(device)
        self.wer = WordErrorRate().to(device)
        self.mer = MatchErrorRate().to(device)
        self.exact = MeanMetric().to(device)
        self.anls = MeanMetric().to(device)
        self.vqa = MeanMetric().to(device)
        self.n_vqa = 0
        self.rows: list[dict] = []  # this rank's predictions (gathered to rank zero for the jsonl)
        self.images: list[tuple[Any, str, str]] = []

    def update(self, preds: list[str], refs: list[str]) -> None:
        # empty references would make CER divide by zero: score them by exact match only
        keep = [i for i, r in enumerate(refs) if r]
        if keep:
            p, r = [preds[i] for i in keep], [refs[i] for i in keep]
            self.cer.update(p, r)
            self.wer.update(p, r)
            self.mer.update(p, r)
        self.exact.update(torch.tensor([float(a == b) for a, b in zip(preds, refs)], device=self.exact.device))


class OCRMetrics(Callback):
    """Score generated answers at the end of every validation (and test) epoch.

    Args:
        max_new_tokens: generation budget per answer.
        max_rows: score at most this many rows per epoch (all ranks together); None scores every row.
        do_sample: False = greedy decoding (the default for scoring).
        generate_kwargs: extra `generate` arguments (num_beams, repetition_penalty, ...).
        strip, lowercase, collapse_whitespace, nfkc, remove_punctuation: `TextNormalizer` settings.
        answers_column: row column holding several reference answers (VQA accuracy; ANLS takes the best of
            them); rows without it count only in the other metrics, and ANLS scores them against the reference.
            ANLS always uses DocVQA's own normalisation (lower case, whitespace collapsed) on the raw text.
        predictions_dir: folder for `<stage>_epoch<E>_step<S>.jsonl` (default `<log_dir>/predictions`).
        log_images: number of (image, prediction, reference) tiles logged to TensorBoard per epoch (0: none).
        on_sanity_check: also score during Lightning's sanity check (off: that pass is only a smoke test).
        rows: normalised rows to score when neither the batches nor the datamodule provide prompts.
        batch_size: generation batch size for `rows`.
        image_base_dir: folder that relative image paths in `rows` are relative to.

    Example:
        >>> trainer = L.Trainer(callbacks=[OCRMetrics(max_new_tokens=32),
        ...                                ModelCheckpoint(monitor="val/cer", mode="min")])  # doctest: +SKIP
    """

    def __init__(
        self,
        max_new_tokens: int = 64, max_rows: int | None = None, do_sample: bool = False,
        generate_kwargs: dict | None = None,
        # the normaliser applied to predictions and answers before scoring (metrics.text.TextNormalizer)
        strip: bool = True, lowercase: bool = False, collapse_whitespace: bool = True, nfkc: bool = True,
        remove_punctuation: bool = False,
        answers_column: str = "answers", predictions_dir: str | None = None, log_images: int = 8,
        on_sanity_check: bool = False,
        # rows to score instead of the data module's validation / test split
        rows: list[dict] | None = None, batch_size: int = 8, image_base_dir: str | None = None,
    ):
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: use None (all rows) or a positive number")
        self.max_new_tokens, self.max_rows, self.do_sample = max_new_tokens, max_rows, do_sample
        self.generate_kwargs = dict(generate_kwargs or {})
        self.normalizer = TextNormalizer(strip, lowercase, collapse_whitespace, nfkc, remove_punctuation)
        self.answers_column, self.predictions_dir = answers_column, predictions_dir
        self.log_images, self.on_sanity_check = log_images, on_sanity_check
        self.rows, self.batch_size, self.image_base_dir = rows, batch_size, image_base_dir
        self.last_scores: dict[str, dict[str, float]] = {}
        self.last_predictions_file: Path | None = None
        self._scores: _StageScores | None = None
        self._answers_by_index: dict[int, list[str] | None] | None = None

    # ------------------------------------------------------------------------------------ hooks
    def _active(self, trainer) -> bool:
        return self.on_sanity_check or not trainer.sanity_checking

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer) and isinstance(batch, dict) and "references" in batch:
            self._score_batch(trainer, pl_module, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "references" in batch:
            self._score_batch(trainer, pl_module, batch, "test")

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._active(trainer):
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")

    # ----------------------------------------------------------------------------------- scoring
    def _start(self, pl_module) -> None:
        self._scores = _StageScores(pl_module.device)
        self._seen = 0  # rows scored on this rank
        # the datamodule's rows may change between runs: rebuild the row-index lookups every epoch
        self._answers_by_index = None
        self.__dict__.pop("_pos_val", None)
        self.__dict__.pop("_pos_test", None)

    def _rank_budget(self, trainer) -> int | None:
        if self.max_rows is None:
            return None
        ws, rank = trainer.world_size, trainer.global_rank
        return self.max_rows // ws + (1 if rank < self.max_rows % ws else 0)

    def _score_batch(self, trainer, pl_module, batch: dict, stage: str, keep: bool = True) -> None:
        if self._scores is None:
            self._start(pl_module)
        budget = self._rank_budget(trainer)
        sharded = shards_parameters(trainer)
        left = len(batch["references"]) if budget is None else max(budget - self._seen, 0)
        if not keep or left == 0:
            if not sharded:
                return
            # FSDP / ZeRO-3: generate all-gathers layers, so every rank must make the same calls;
            # generate and drop the rows instead of skipping
            run_unsharded(trainer, pl_module, "generate", batch, max_new_tokens=self.max_new_tokens,
                          do_sample=self.do_sample, **self.generate_kwargs)
            return
        preds = run_unsharded(trainer, pl_module, "generate", batch, max_new_tokens=self.max_new_tokens,
                              do_sample=self.do_sample, **self.generate_kwargs)
        refs = list(batch["references"])
        idx = [int(i) for i in batch.get("row_index", range(self._seen, self._seen + len(refs)))]
        images = batch.get("images") or [None] * len(refs)
        n = min(len(refs), left)
        preds, refs, idx, images = preds[:n], refs[:n], idx[:n], images[:n]
        self._seen += n
        p = [self.normalizer(x) for x in preds]
        r = [self.normalizer(x) for x in refs]
        s = self._scores
        s.update(p, r)
        answers = self._answers_for(trainer, stage, idx)
        for k in range(n):
            row = {"row_index": idx[k], "prediction": preds[k], "reference": refs[k],
                   "cer": cer(p[k], r[k]), "anls": anls(preds[k], answers[k] or [refs[k]])}
            s.anls.update(torch.tensor(row["anls"], device=s.anls.device))
            if answers[k]:
                acc = vqa_accuracy(p[k], [self.normalizer(a) for a in answers[k]])
                s.vqa.update(torch.tensor(acc, device=s.vqa.device))
                s.n_vqa += 1
                row["answers"], row["vqa_acc"] = list(answers[k]), acc
            s.rows.append(row)
            if len(s.images) < self.log_images and images[k]:
                first = images[k][0] if isinstance(images[k], (list, tuple)) else images[k]
                s.images.append((first, preds[k], refs[k]))

    def _answers_for(self, trainer, stage: str, idx: list[int]) -> list[list[str] | None]:
        """The `answers` column of the source rows (by row index), when the datamodule has one."""
        if self._answers_by_index is None:
            self._answers_by_index = {}
            if self.rows is not None:
                for i, row in enumerate(self.rows):
                    self._answers_by_index[int(row.get("index", i))] = row.get(self.answers_column)
        if self.rows is None:
            dm = getattr(trainer, "datamodule", None)
            ds = (getattr(dm, "datasets", None) or {}).get(stage)
            if ds is not None and hasattr(ds, "raw"):
                pos = getattr(self, f"_pos_{stage}", None)
                if pos is None:
                    pos = {src: k for k, src in enumerate(getattr(ds, "indices", range(len(ds))))}
                    setattr(self, f"_pos_{stage}", pos)
                out = []
                for i in idx:
                    ans = ds.raw(pos[i]).get(self.answers_column) if i in pos else None
                    out.append(list(ans) if isinstance(ans, (list, tuple)) and len(ans) > 0 else None)
                return out
        return [self._answers_by_index.get(i) for i in idx]

    def _generation_batches(self, trainer, pl_module, stage: str):
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "generation_dataloader") and stage in (getattr(dm, "datasets", None) or {}):
            loader = dm.generation_dataloader(stage)
        elif self.rows is not None:
            collate = VisionChatCollator(pl_module.processor, for_generation=True, base_dir=self.image_base_dir)
            bs = self.batch_size
            loader = (collate(self.rows[i:i + bs]) for i in range(0, len(self.rows), bs))
        else:
            raise ValueError(
                "OCRMetrics found no prompts to score: use VisionChatDataModule (with a val split), "
                "eval_for_generation=True batches, or pass rows= to OCRMetrics")
        ws, rank = trainer.world_size, trainer.global_rank
        mine, last = 0, None
        for b, batch in enumerate(loader):
            if b % ws == rank and batch is not None:
                mine, last = mine + 1, batch
                yield batch, True
        if ws > 1 and shards_parameters(trainer) and last is not None:
            # equal generate calls on every rank (FSDP collectives): repeat the last batch, results dropped
            n_batches = b + 1
            for _ in range((n_batches + ws - 1) // ws - mine):
                yield last, False

    def _finish(self, trainer, pl_module, stage: str) -> None:
        if self._scores is None:
            self._start(pl_module)
        if self._seen == 0:  # batches carried no prompts: generate from the datamodule's prompt-only loader
            budget, sharded = self._rank_budget(trainer), shards_parameters(trainer)
            for batch, keep in self._generation_batches(trainer, pl_module, stage):
                if budget is not None and self._seen >= budget and not sharded:
                    break
                self._score_batch(trainer, pl_module, batch, stage, keep=keep)
        s = self._scores
        seen = torch.tensor(float(self._seen), device=pl_module.device)
        if int(trainer.strategy.reduce(seen, reduce_op="sum")) == 0:
            raise ValueError(f"OCRMetrics: no {stage} rows were scored")
        scores = {"cer": s.cer.compute(), "wer": s.wer.compute(), "mer": s.mer.compute(),
                  "exact_match": s.exact.compute(), "anls": s.anls.compute()}
        n_vqa = int(trainer.strategy.reduce(torch.tensor(float(s.n_vqa), device=pl_module.device), reduce_op="sum"))
        if n_vqa:
            scores["vqa_acc"] = s.vqa.compute()
        for key, value in scores.items():
            pl_module.log(f"{stage}/{key}", value.float(), prog_bar=key == "cer", sync_dist=False, on_epoch=True)
        self.last_scores[stage] = {k: float(v) for k, v in scores.items()}
        rows = all_gather_objects(trainer, s.rows)
        if trainer.is_global_zero:
            directory = Path(self.predictions_dir) if self.predictions_dir else \
                Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
            self.last_predictions_file = write_predictions(directory, stage, trainer.current_epoch,
                                                           trainer.global_step, rows)
            if self.log_images:
                log_sample_grid(trainer, stage, s.images)
        self._scores = None
