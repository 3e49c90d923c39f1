"""VisionChatDataModule: load rows, split, validate once, and serve collated batches.

``prepare_data`` builds a ``tiny:<name>`` model folder once (one process); ``setup`` reads the rows
(``datasets.py``), splits off validation, validates (``check.py``) and drops or refuses bad rows; the loaders
collate with ``collate.py``. The processor is built with transformers' ``AutoProcessor`` from the path (or
handed in), with the pixel bounds applied. What is left out: any model; the model module gets this
processor through the CLI's link.

Example:
    >>> dm = VisionChatDataModule("tiny:qwen2_vl", train="data/train.jsonl", val_fraction=0.1, batch_size=4)
    >>> dm.prepare_data(); dm.setup("fit")
    >>> batch = next(iter(dm.train_dataloader()))
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoProcessor

from vlm_lightning.models.tiny import resolve_model_path

from .check import EMPTY_ANSWER, DataCheckReport, check_splits, strip_row_prefix
from .collate import VisionChatCollator
from .datasets import ConversationDataset, load_rows
from .fetch import MAX_IMAGE_BYTES
from .formats import DEFAULT_INSTRUCTION, FormatOptions, RowFormatError, has_empty_answer
from .packing import CollatePacks, PackedRows, pack_split, token_budget
from .sampling import ResumableLoader, ResumableSampler, resume_position

log = logging.getLogger(__name__)


class VisionChatDataModule(L.LightningDataModule):
    """Chat-style multimodal data for SFT / GRPO: rows -> normalised conversations -> collated batches.

    Args:
        model_name_or_path: where ``AutoProcessor`` loads the processor from (ignored if ``processor`` given).
        train, val, test: a list of rows, a ``.jsonl``/``.json``/``.parquet`` file, an imagefolder or
            ``save_to_disk`` folder, or a hub id (only when online). Row formats: see ``data/formats.py``.
        processor: a ready processor (skips ``AutoProcessor``).
        batch_size, eval_batch_size, num_workers: DataLoader settings (eval defaults to ``batch_size``).
        seed: seeds the train shuffle and the ``val_fraction`` split.
        val_fraction: when ``val`` is not given, this fraction of ``train`` becomes the validation split.
        format, system_prompt, instruction, *_column: how rows are read (``FormatOptions``).
        max_length, train_on_responses_only, on_overlong: collator settings.
        on_bad_example: "raise" stops at the first bad row; "skip" validates every row in ``setup`` (images,
            tokens, truncation), drops bad ones, and reports the counts (printed and to the logger). Malformed
            JSONL lines are bad examples too: "raise" names the file and line, "skip" leaves them out and counts
            them in the split's ``num_skipped``.
        validate: run that validation even with "raise" (default: only with "skip").
        on_empty_answer: a row whose assistant answer is empty ("" or whitespace) would train only the
            end-of-turn token: "raise" (default) refuses it in ``setup`` naming the row, "skip" drops and counts
            it, "keep" trains on it. Only for splits served with labels (not ``*_for_generation`` ones, where
            the answer is just a reference).
        min_pixels, max_pixels: image pixel bounds (images are resized, and Qwen-VL processors configured).
        image_timeout_s, image_fetch_budget_s, max_image_bytes: image URLs (http/https only) get
            ``image_timeout_s`` per attempt (two attempts), may cost a split ``image_fetch_budget_s`` seconds of
            failing fetches in all, and are refused over ``max_image_bytes`` (``data:`` URIs too) before decoding.
        eval_for_generation: val/test batches are prompt-only (left padded, with ``references``) instead of
            teacher-forced batches with labels.
        train_for_generation: train batches are prompt-only too (GRPO samples its own completions).
        packing: padding-free SFT: each train micro-batch is one sequence of whole rows, kept apart in attention
            and positions (exact: same loss and gradients as padded batches; no FLOPs on padding, but the
            packs are fixed for the run and only their order is shuffled). Default off. Needs every train
            row's length, so ``setup`` walks the rows once as with ``validate``. Val/test stay padded.
        max_tokens_per_batch: the token budget of one packed micro-batch, image placeholder tokens included
            (default ``batch_size * max_length``); ``batch_size`` is not used for packed train batches. A row
            longer than the budget is refused in ``setup`` naming it (``on_overlong="skip"``: dropped, counted).

    Example:
        >>> dm = VisionChatDataModule("path/to/tiny-qwen2-vl", train="data/train.jsonl", val_fraction=0.1,
        ...                           batch_size=4, max_length=1024)
        >>> dm.setup("fit")
        >>> report = dm.check()  # prints a short report
        >>> batch = next(iter(dm.train_dataloader()))
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        train: Any = None,
        val: Any = None,
        test: Any = None,
        processor: Any = None,
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.0,
        format: str = "auto",
        system_prompt: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        image_column: str | None = None,
        text_column: str | None = None,
        question_column: str | None = None,
        answer_column: str | None = None,
        max_length: int | None = None,
        train_on_responses_only: bool = True,
        on_overlong: str = "raise",
        on_bad_example: str = "raise",
        validate: bool | None = None,
        on_empty_answer: str = "raise",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        image_timeout_s: float = 10.0,
        image_fetch_budget_s: float = 120.0,
        max_image_bytes: int | None = MAX_IMAGE_BYTES,
        eval_for_generation: bool = False,
        train_for_generation: bool = False,
        packing: bool = False,
        max_tokens_per_batch: int | None = None,
    ):
        super().__init__()
        if on_bad_example not in ("raise", "skip"):
            raise ValueError(f"on_bad_example={on_bad_example!r}: expected 'raise' or 'skip'")
        if on_overlong not in ("raise", "skip"):
            raise ValueError(f"on_overlong={on_overlong!r}: expected 'raise' or 'skip'")
        if on_empty_answer not in ("raise", "skip", "keep"):
            raise ValueError(f"on_empty_answer={on_empty_answer!r}: expected 'raise', 'skip' or 'keep'")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if model_name_or_path is None and processor is None:
            raise ValueError("pass model_name_or_path (to build the processor) or processor=")
        self.save_hyperparameters(ignore=["train", "val", "test", "processor"])
        self.model_name_or_path = model_name_or_path
        self.sources = {"train": train, "val": val, "test": test}
        self.processor = processor
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        self.format_kwargs = dict(
            format=format, system_prompt=system_prompt, instruction=instruction, image_column=image_column,
            text_column=text_column, question_column=question_column, answer_column=answer_column,
        )
        FormatOptions(**self.format_kwargs)  # validate early
        self.max_length = max_length
        self.train_on_responses_only = train_on_responses_only
        self.on_overlong = on_overlong
        self.on_bad_example = on_bad_example
        self.validate = (on_bad_example == "skip") if validate is None else validate
        self.on_empty_answer = on_empty_answer
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.image_fetch = dict(image_timeout_s=image_timeout_s, image_fetch_budget_s=image_fetch_budget_s,
                                max_image_bytes=max_image_bytes)
        self.eval_for_generation = eval_for_generation
        self.train_for_generation = train_for_generation
        self.packing = packing
        self.max_tokens_per_batch = token_budget(packing, max_tokens_per_batch, batch_size, max_length,
                                                 train_for_generation)
        self.validate = self.validate or packing  # the walk that measures every row, once
        self.packs: list[list[int]] | None = None  # train row positions of each packed micro-batch
        self.datasets: dict[str, ConversationDataset] = {}
        self.num_skipped: dict[str, int] = {}
        self.report: DataCheckReport | None = None

    # ----------------------------------------------------------------------------------- processor

    @property
    def processor_kwargs(self) -> dict[str, int]:
        """What makes this data module's processor differ from the base's (the pixel bounds). The model
        module records it in its checkpoints so an export rebuilds the same processor with ``build_processor``."""
        bounds = (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels))
        return {k: int(v) for k, v in bounds if v is not None}

    def get_processor(self):
        """The processor (built from ``model_name_or_path`` on first use, with the pixel bounds applied)."""
        if self.processor is None:
            self.processor = build_processor(self.model_name_or_path)
        apply_pixel_bounds(self.processor, self.min_pixels, self.max_pixels)
        return self.processor

    def collator(self, for_generation: bool = False, packing: bool = False) -> VisionChatCollator:
        return VisionChatCollator(
            self.get_processor(), max_length=self.max_length, train_on_responses_only=self.train_on_responses_only,
            for_generation=for_generation, on_overlong=self.on_overlong, min_pixels=self.min_pixels,
            max_pixels=self.max_pixels, on_bad_example=self.on_bad_example, packing=packing, **self.image_fetch,
        )

    # --------------------------------------------------------------------------------------- setup

    def prepare_data(self) -> None:
        """Build the ``tiny:<name>`` model folder the processor comes from, once (Lightning runs this on one
        process; the build is atomic, so a rank that calls ``setup`` directly still never sees half a folder)."""
        if self.processor is None and self.model_name_or_path is not None:
            resolve_model_path(self.model_name_or_path)

    def setup(self, stage: str | None = None) -> None:
        """Read every split (``val_fraction`` split off), then drop or refuse rows: bad ones per ``on_bad_example``
        (with ``validate`` the full walk of ``check()``, else the cheap format pass), empty answers per
        ``on_empty_answer``. A split left without rows raises a ``ValueError`` naming it and its skip counts:
        train always, val/test when skipping emptied them (an eval split empty in its source, e.g. the
        ``val_fraction`` of a one-row train set, is legitimate: its loader logs a warning)."""
        if self.datasets:
            return
        self.get_processor()
        datasets, bad_lines = self._load(self.on_bad_example)
        self.report = (check_splits(datasets, self.collator(), None, self.max_length, bad_lines)
                       if self.validate else None)
        num_skipped = {}
        for name, ds in datasets.items():
            if self.report is not None:
                bad, empty = dict(self.report.splits[name].errors), self.report.splits[name].empty_answers
            else:
                bad, empty = self._check_formats(ds)
            if bad and self.on_bad_example == "raise":
                idx, reason = next(iter(bad.items()))
                raise ValueError(f"{name} split: {ds.row_label(idx)}: {reason}")
            trains_on_answers = not (self.train_for_generation if name == "train" else self.eval_for_generation)
            empty = [i for i in empty if i not in bad] if trains_on_answers and self.on_empty_answer != "keep" else []
            if empty and self.on_empty_answer == "raise":
                raise ValueError(f"{name} split: {ds.row_label(empty[0])}: {EMPTY_ANSWER}")
            drop = set(bad) | set(empty)
            datasets[name] = ds.subset([k for k, src in enumerate(ds.indices) if src not in drop])
            num_skipped[name] = len(drop) + len(bad_lines[name])
            if len(datasets[name]) == 0 and (name == "train" or num_skipped[name]):
                raise ValueError(_no_rows_left(name, len(ds), len(bad), len(empty), len(bad_lines[name])))
        if self.packing and "train" in datasets:  # rows over the budget raise naming the row, or are dropped
            datasets["train"], self.packs, over = pack_split(datasets["train"], self.report.splits["train"].lengths,
                                                             self.max_tokens_per_batch, self.on_overlong)
            num_skipped["train"] += over
        self.datasets, self.num_skipped = datasets, num_skipped
        self._report_skips()

    def _load(self, on_bad_line: str) -> tuple[dict[str, ConversationDataset], dict[str, list[tuple[int, str]]]]:
        """Every split's rows, with ``val_fraction`` split off (no row checked yet), and per split the malformed
        JSONL lines skipped, as (line, reason) (``on_bad_line="skip"``; they raise otherwise)."""
        loaded, bad_lines = {}, {}
        for name, source in self.sources.items():
            if source is not None:
                src = load_rows(source, {"val": "validation"}.get(name, name), on_bad_line=on_bad_line)
                opts = FormatOptions(**self.format_kwargs, base_dir=src.base_dir)
                loaded[name] = ConversationDataset(src.rows, opts, name=name, lines=src.lines)
                bad_lines[name] = src.bad_lines
        if "train" in loaded and "val" not in loaded and self.val_fraction > 0:
            train = loaded["train"]
            order = list(range(len(train)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(len(order) * self.val_fraction)) if len(order) > 1 else 0
            loaded["val"] = ConversationDataset(train.rows, train.opts, sorted(order[:n_val]), "val", train.lines)
            loaded["train"] = ConversationDataset(train.rows, train.opts, sorted(order[n_val:]), "train", train.lines)
            bad_lines["val"] = []
        return loaded, bad_lines

    def _check_formats(self, ds: ConversationDataset) -> tuple[dict[int, str], list[int]]:
        """The cheap pass (no images, no tokens): rows that cannot be normalised (row index -> reason) and rows
        with an empty assistant answer; done in ``setup`` rather than mid-epoch."""
        bad, empty = {}, []
        for k, src in enumerate(ds.indices):
            try:
                row = ds[k]
            except RowFormatError as e:
                bad[src] = strip_row_prefix(str(e), src)
                if self.on_bad_example == "raise":
                    break
                continue
            if has_empty_answer(row["messages"]):
                empty.append(src)
        return bad, empty

    def _report_skips(self) -> None:
        """Split sizes and skipped rows to the module logger (a warning when rows were dropped), the skip
        counts to the trainer's logger."""
        sizes = ", ".join(f"{n}={len(d)}" for n, d in self.datasets.items())
        skipped = {n: c for n, c in self.num_skipped.items() if c}
        timeouts = {n: s.timeouts for n, s in self.report.splits.items() if s.timeouts} if self.report else {}
        log.log(logging.WARNING if skipped else logging.INFO, "VisionChatDataModule: rows %s; skipped bad rows: %s%s",
                sizes, skipped or "none", f" (image URL timeouts: {timeouts})" if timeouts else "")
        if self.trainer is not None and self.trainer.logger is not None:
            self.trainer.logger.log_metrics({f"data/skipped_{n}": float(c) for n, c in self.num_skipped.items()},
                                            step=0)

    # --------------------------------------------------------------------------------------- check

    def check(self, splits: Sequence[str] | None = None, verbose: bool = True) -> DataCheckReport:
        """Walk every row once (``check.check_splits``): load images, template + tokenize, compare image tokens
        with the vision tower's feature count, and find rows that would be truncated or cannot be. Prints (with
        ``verbose``) and returns a :class:`DataCheckReport`; never raises for a bad row (it is listed). Before
        ``setup`` it reads the splits itself and keeps nothing, so it lists the rows (and malformed JSONL lines)
        ``setup`` would refuse; after ``setup`` it walks the rows that ``setup`` kept."""
        datasets, bad_lines = (self.datasets, None) if self.datasets else self._load("skip")
        report = check_splits(datasets, self.collator(), splits, self.max_length, bad_lines)
        if verbose:
            print(report)
        return report

    # --------------------------------------------------------------------------------- dataloaders

    def _loader(self, name: str, shuffle: bool, batch_size: int, for_generation: bool) -> DataLoader:
        if name not in self.datasets:
            raise ValueError(f"no {name} data: pass {name}= (or val_fraction for val) to VisionChatDataModule")
        if len(self.datasets[name]) == 0:  # empty in its source (setup raises when skipping emptied it)
            log.warning("VisionChatDataModule: the %s split has 0 rows: its loader yields no batch", name)
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[name], batch_size=batch_size, shuffle=shuffle, generator=generator,
            num_workers=self.num_workers, collate_fn=self.collator(for_generation),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (``seed`` + epoch) train batches, sharded over ranks; after a restart from a mid-epoch
        checkpoint the first epoch starts at the first batch the interrupted run had not trained on."""
        if "train" not in self.datasets:
            raise ValueError("no train data: pass train= to VisionChatDataModule")
        trainer = getattr(self, "trainer", None)
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        dataset, batch_size, collate = self.datasets["train"], self.batch_size, self.collator(self.train_for_generation)
        if self.packing:  # one pack (whole rows, at most max_tokens_per_batch tokens) per micro-batch
            dataset, batch_size, collate = PackedRows(dataset, self.packs), 1, CollatePacks(self.collator(packing=True))
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=self.seed)
        done, data_epoch = resume_position(trainer, -(-len(sampler) // batch_size))
        if done:
            sampler.start = done * batch_size
            sampler.epoch_offset = data_epoch - trainer.current_epoch
            sampler.set_epoch(trainer.current_epoch)
        return ResumableLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size, self.eval_for_generation)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size, self.eval_for_generation)

    def predict_dataloader(self) -> DataLoader:
        name = "test" if "test" in self.datasets else "val"
        return self._loader(name, False, self.eval_batch_size, True)

    def generation_dataloader(self, split: str = "val") -> DataLoader:
        """Prompt-only batches (left padded, with ``references``) of ``split``, for sampling and scoring."""
        return self._loader(split, False, self.eval_batch_size, True)

    def state_dict(self) -> dict:
        return {"num_skipped": dict(self.num_skipped)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.num_skipped = dict(state_dict.get("num_skipped", {}))


def _no_rows_left(name: str, rows: int, bad: int, empty: int, bad_lines: int) -> str:
    """The error of a split that ``setup`` left without rows, with its skip counts."""
    lines = f"; {bad_lines} invalid JSON line(s) skipped" if bad_lines else ""
    if not rows:
        return f"{name} split has no rows: its source holds none{lines}"
    counts = ", ".join(f"{n} {what}" for n, what in ((bad, "bad"), (empty, "empty answer")) if n)
    return (f"{name} split has no rows left: {bad + empty} of {rows} rows skipped ({counts}){lines}; "
            "dm.check() lists them")


def build_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None,
                    trust_remote_code: bool = False):
    """``AutoProcessor`` of ``name_or_path`` (``tiny:<name>`` built on first use) with the pixel bounds applied:
    the processor ``VisionChatDataModule`` trains with, rebuilt from its ``processor_kwargs``.

    Example:
        >>> proc = build_processor("Qwen/Qwen2.5-VL-7B-Instruct", max_pixels=802816)
    """
    processor = AutoProcessor.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    apply_pixel_bounds(processor, min_pixels, max_pixels)
    return processor


def apply_pixel_bounds(processor: Any, min_pixels: int | None, max_pixels: int | None) -> None:
    """Set ``min_pixels``/``max_pixels`` on a Qwen-VL style image processor (no-op for other families,
    whose images are resized by ``load_image`` instead). Checked after setting: a bound the
    image processor silently ignored would change the training resolution unnoticed."""
    ip = getattr(processor, "image_processor", None)
    if ip is None or (min_pixels is None and max_pixels is None) or not hasattr(ip, "merge_size"):
        return
    size = dict(getattr(ip, "size", None) or {})
    for key, value, attr in (("shortest_edge", min_pixels, "min_pixels"), ("longest_edge", max_pixels, "max_pixels")):
        if value is None:
            continue
        size[key] = int(value)
        if hasattr(ip, attr):
            setattr(ip, attr, int(value))
    ip.size = size
    got = dict(ip.size)
    if max_pixels is not None and got.get("longest_edge") != int(max_pixels):
        raise RuntimeError(f"could not set max_pixels={max_pixels} on {type(ip).__name__} (size={got})")
