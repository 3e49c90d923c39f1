"""What a GRPO step reports: the rollout's metrics and a few sample completions (with their first image).

Pure functions of the step's tensors, kept out of ``grpo.py`` so the module reads as rollout -> score ->
update. Samples go to TensorBoard or W&B when one is attached, else to the Python log; a logging failure never
stops training.

Example:
    >>> metrics = rollout_metrics(rewards, per_fn, adv, rollout, num_generations=8, batch_size=4)
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from vlm_lightning.rollout import Rollout

__all__ = ["log_samples", "nan_stats", "rollout_metrics", "sample_rows"]

log = logging.getLogger(__name__)


def nan_stats(x: torch.Tensor) -> tuple[float, float]:
    """(mean, std) over the non-NaN entries (NaN, NaN when there are none)."""
    v = x[~torch.isnan(x)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def rollout_metrics(rewards: torch.Tensor, per_fn: dict[str, torch.Tensor], adv: torch.Tensor, rollout: Rollout,
                    num_generations: int, batch_size: int) -> dict[str, float]:
    """Reward, advantage and completion-length statistics of one rollout (rows in tile order)."""
    m: dict[str, float] = {}
    m["reward/mean"], m["reward/std"] = nan_stats(rewards)
    for name, r in per_fn.items():
        m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = nan_stats(r)
    groups = torch.nan_to_num(rewards.view(num_generations, batch_size).t(), nan=0.0)  # (B, G)
    m["reward/frac_zero_std"] = float(((groups.amax(1) - groups.amin(1)) == 0).float().mean())
    m["advantages/mean"] = float(adv.mean())
    m["advantages/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
    m["advantages/abs_max"] = float(adv.abs().max())
    lengths = rollout.completion_mask.sum(1).float()
    m["completions/mean_length"] = float(lengths.mean())
    m["completions/min_length"] = float(lengths.min())
    m["completions/max_length"] = float(lengths.max())
    m["completions/truncated_frac"] = float(rollout.truncated.float().mean())
    m["completions/rejected_frac"] = float(rollout.rejected.float().mean())
    return m


def sample_rows(tiled: dict, rollout: Rollout, rewards: torch.Tensor, adv: torch.Tensor, n: int) -> list[dict]:
    """The first ``n`` completions with their prompt, reference, reward, advantage and first image."""
    k = len(rollout.texts)
    prompts, refs = tiled.get("prompts") or [""] * k, tiled.get("references") or [None] * k
    images = tiled.get("images") or [[]] * k
    return [{"prompt": prompts[i], "completion": rollout.texts[i], "reference": refs[i],
             "reward": float(rewards[i]), "advantage": float(adv[i]), "image": (images[i] or [None])[0]}
            for i in range(min(n, k))]


def log_samples(logger: Any, samples: list[dict[str, Any]], step: int) -> None:
    """Completions (and their first image) to TensorBoard / W&B when attached, else the Python log."""
    exp = getattr(logger, "experiment", None) if logger is not None else None
    try:
        if exp is not None and hasattr(exp, "add_text"):  # TensorBoard
            rows = "\n".join(f"| {s['reward']:.3f} | {s['advantage']:+.3f} | `{s['reference']}` | "
                             f"`{s['completion'][:200]!r}` |" for s in samples)
            exp.add_text("samples", "| reward | adv | reference | completion |\n|---|---|---|---|\n" + rows, step)
            for i, s in enumerate(samples):
                if s["image"] is not None:
                    exp.add_image(f"samples/image_{i}", np.asarray(s["image"]), step, dataformats="HWC")
            return
        if exp is not None and hasattr(logger, "log_table"):  # W&B
            import wandb  # optional dependency: only when a W&B logger is attached

            data = [[wandb.Image(s["image"]) if s["image"] is not None else None, s["reference"],
                     s["completion"], s["reward"], s["advantage"]] for s in samples]
            logger.log_table("samples", columns=["image", "reference", "completion", "reward", "advantage"],
                             data=data, step=step)
            return
    except Exception as exc:  # noqa: BLE001 - logging samples must never stop training
        log.warning("could not log sample completions: %s", exc)
    for s in samples:
        log.info("step %d reward %.3f adv %+.3f ref %r completion %r", step, s["reward"], s["advantage"],
                 s["reference"], s["completion"][:200])
