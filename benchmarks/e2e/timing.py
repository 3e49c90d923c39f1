"""A Lightning callback that times a ``vlm-lightning fit`` run from outside the module (no module change).

Added to a recipe run with a config file or ``--trainer.callbacks+=e2e_timing.E2ETimer``: ``bench_e2e.sh`` copies
this file as ``e2e_timing.py`` into a folder of its own and puts that folder on ``PYTHONPATH`` (the repository
root there would let ``kernels/`` pass for the Hub's ``kernels`` package). On global rank zero it appends one
JSON line to ``out`` at the end of training:

  process_to_setup_s      process start (imports, CLI parsing, instantiation) to the Trainer's first hook
  model_load_s            ``configure_model`` (base weights, kernels patch, LoRA, speed levers)
  setup_to_first_step_s   "fit start to the first optimizer step": first hook of ``fit`` to the end of the
                          first optimizer step (model load, strategy setup and wrapping, sanity validation,
                          data loader start, first forward/backward incl. Triton compiles, optimizer step)
  process_to_first_step_s the same from process start
  steps_per_s             optimizer steps/s over steps 2..N (the first step's compiles left out)
  tokens_per_s            attention-mask tokens/s over the same window
  peak_gib                torch.cuda.max_memory_allocated
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


def _process_start() -> float | None:
    try:
        import psutil

        return psutil.Process(os.getpid()).create_time()
    except Exception:  # noqa: BLE001 - optional
        return None


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class E2ETimer(Callback):
    """Stage times of one fit run, written as a JSON line to ``out`` (rank zero)."""

    def __init__(self, out: str = "e2e_fit.jsonl", label: str = "fit"):
        self.out, self.label = out, label
        self.t_process = _process_start()
        self.t_init = time.time()
        self.t_setup = self.t_fit_start = self.t_train_start = None
        self.model_load_s = None
        self.step_times: list[float] = []
        self.tokens_after_first = 0
        self._last_step = 0

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.t_setup is not None:
            return
        self.t_setup = time.time()
        original = pl_module.configure_model

        def timed_configure_model(*args, **kwargs):
            t = time.time()
            result = original(*args, **kwargs)
            if self.model_load_s is None:
                _sync()
                self.model_load_s = time.time() - t
            return result

        pl_module.configure_model = timed_configure_model  # instance attribute: Lightning calls getattr()

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t_fit_start = time.time()

    def on_train_start(self, trainer, pl_module) -> None:
        self.t_train_start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step_times and isinstance(batch, dict) and "attention_mask" in batch:
            self.tokens_after_first += int(batch["attention_mask"].sum())
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            _sync()
            self.step_times.append(time.time())

    def on_train_end(self, trainer, pl_module) -> None:
        _sync()
        if not trainer.is_global_zero:
            return
        st = self.step_times
        rel = (lambda t: None if t is None or self.t_setup is None else round(t - self.t_setup, 2))
        row = {
            "stage": self.label, "optimizer_steps": len(st), "global_step": trainer.global_step,
            "process_to_setup_s": round(self.t_setup - self.t_process, 2) if self.t_process and self.t_setup else None,
            "model_load_s": round(self.model_load_s, 2) if self.model_load_s is not None else None,
            "setup_to_fit_start_s": rel(self.t_fit_start),
            "setup_to_train_start_s": rel(self.t_train_start),
            "setup_to_first_step_s": rel(st[0]) if st else None,
            "process_to_first_step_s": round(st[0] - self.t_process, 2) if st and self.t_process else None,
            "steps_per_s": round((len(st) - 1) / (st[-1] - st[0]), 3) if len(st) > 1 else None,
            "s_per_step": round((st[-1] - st[0]) / (len(st) - 1), 3) if len(st) > 1 else None,
            "tokens_per_s": round(self.tokens_after_first / (st[-1] - st[0])) if len(st) > 1 else None,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
            "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "loss": _scalar(trainer.callback_metrics.get("train/loss")),
        }
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        with open(self.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print("E2E_TIMER " + json.dumps(row), flush=True)


def _scalar(value):
    try:
        return round(float(value), 4)
    except (TypeError, ValueError):
        return None
