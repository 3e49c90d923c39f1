"""The update half of a GRPO step: micro-batches sized by tokens, old / reference log-probs, the policy passes.

``VisionGRPOModule.training_step`` samples and scores; ``policy_updates`` (here) then runs:

  1. ``plan_micro_batches``: whole tiles of the prompt batch (B rows each, any family's vision inputs stay
     valid), grouped so that each forward holds at most ``max_tokens_per_micro_batch`` tokens
     (B x (prompt + kept completion width)) and at most ``generations_per_micro_batch`` tiles; the completion
     columns after a micro-batch's longest active completion are dropped (causal attention: exact);
  2. old log-probs only when ``num_iterations > 1`` (otherwise the policy's own detached log-probs are the old
     ones: no extra forward) and reference log-probs only when ``beta > 0`` (adapters off);
  3. ``num_iterations`` optimiser steps, each accumulating the micro-batches' gradients; the loss is
     normalised by the whole step's rows / active tokens (``aggregate_loss(batch_rows=, batch_tokens=)``), so
     any split gives the one-batch loss and gradient;
  4. the rollout correction (TIS / MIS, ``losses.rollout_correction``) between the engine's sampling log-probs
     and the trainer's old ones, and its mismatch metrics.

Example:
    >>> sums = policy_updates(module, prompt_batch, rollout, ids, mask, adv, n_active, world=1)
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..losses.grpo import clipped_policy_loss
from ..losses.rollout_correction import rollout_correction_weights, rollout_mismatch_metrics
from ..models.hf import model_inputs
from ..rollout import Rollout, completion_logprobs, tile_batch
from ..rollout.batch import plan_tile_micro_batches

__all__ = ["MicroBatch", "plan_micro_batches", "policy_updates", "resolve_rollout_correction"]

log = logging.getLogger(__name__)


class MicroBatch(NamedTuple):
    """Consecutive whole tiles of a GRPO step: what one forward / backward sees."""

    rows: slice  # rows of the step in tile order: tiles t0..t1-1 are rows t0*B .. t1*B-1
    width: int  # completion columns kept, the longest active completion among these rows (>= 1)
    inputs: dict[str, torch.Tensor]  # the prompt batch's model inputs tiled t1 - t0 times, on the device


def plan_micro_batches(prompt_batch: dict, mask: torch.Tensor, num_generations: int, device: torch.device,
                       generations_per_micro_batch: int | None = None,
                       max_tokens_per_micro_batch: int | None = None) -> list[MicroBatch]:
    """Split a step's N = G * B rows into micro-batches of whole tiles (``rollout.batch.plan_tile_micro_batches``).

    Args:
        prompt_batch: the collated B-prompt batch. mask: (N, C) the completion mask the loss uses.
        num_generations: G. device: where the inputs go.
        generations_per_micro_batch, max_tokens_per_micro_batch: the two caps (None: no cap).
    """
    b = prompt_batch["input_ids"].shape[0]
    p = prompt_batch["input_ids"].shape[1]
    lengths = mask.sum(1).view(num_generations, b)  # (G, B) active tokens (masks are contiguous from 0)
    widths = [max(1, int(lengths[t].max())) for t in range(num_generations)]
    plan = plan_tile_micro_batches([b * (p + w) for w in widths], max_tokens_per_micro_batch,
                                   generations_per_micro_batch)
    tiled: dict[int, dict[str, torch.Tensor]] = {}
    out = []
    for t0, t1 in plan:
        k = t1 - t0
        if k not in tiled:
            tiled[k] = {key: v.to(device) for key, v in model_inputs(tile_batch(prompt_batch, k)).items()}
        out.append(MicroBatch(slice(t0 * b, t1 * b), max(widths[t0:t1]), tiled[k]))
    return out


def micro_logprobs(module: Any, mb: MicroBatch, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, C) token log-probs of a micro-batch's completions (0 in the dropped columns)."""
    hp = module.hparams
    lp = completion_logprobs(module.model, mb.inputs, ids[mb.rows, : mb.width], mask[mb.rows, : mb.width],
                             temperature=hp.temperature, use_kernels=hp.use_kernels)
    return F.pad(lp, (0, ids.shape[1] - mb.width))


def resolve_rollout_correction(option: str | None, rollout: Rollout, warned: set) -> str | None:
    """"auto" -> "tis" when the rollout carries the engine's sampling log-probs (the fast engine), else None;
    "tis" / "mis" without them -> None with a warning (once)."""
    has = rollout.sampling_logprobs is not None
    if option == "auto":
        return "tis" if has else None
    if option is not None and not has:
        if option not in warned:
            log.warning("rollout_correction=%r: backend %r returned no sampling log-probs (only the fast engine "
                        "does); no correction", option, rollout.backend)
            warned.add(option)
        return None
    return option


def policy_updates(module: Any, prompt_batch: dict, rollout: Rollout, ids: torch.Tensor, mask: torch.Tensor,
                   adv: torch.Tensor, n_active: torch.Tensor, world: int) -> dict[str, float]:
    """Old / reference log-probs and ``num_iterations`` optimiser steps over the rollout.

    Args:
        module: the ``VisionGRPOModule`` (its model, hparams, optimizers, guards).
        prompt_batch: the collated B prompts. rollout: the step's ``Rollout``.
        ids, mask: (N, C) completion ids and the loss mask, on the device. adv: (N,) advantages.
        n_active: active tokens of the step over all ranks (dapo's normaliser). world: the number of ranks.

    Returns:
        the step's loss (sum over micro-batches, mean over iterations), the loss metrics (means over the
        step's active tokens) and the rollout-correction metrics.
    """
    hp = module.hparams
    g = hp.num_generations
    micro = plan_micro_batches(prompt_batch, mask, g, ids.device, hp.generations_per_micro_batch,
                               hp.max_tokens_per_micro_batch)
    mode = resolve_rollout_correction(hp.rollout_correction, rollout, module._warned)
    sampling_lp = rollout.sampling_logprobs.to(ids.device) if rollout.sampling_logprobs is not None else None
    old_logps: list[torch.Tensor | None] = [None] * len(micro)
    ref_logps: list[torch.Tensor | None] = [None] * len(micro)
    with torch.no_grad():
        for j, mb in enumerate(micro):
            if hp.num_iterations > 1:  # with one iteration the policy's own detached log-probs are the old ones
                old_logps[j] = micro_logprobs(module, mb, ids, mask)
            if hp.beta > 0:
                with module.reference_policy():
                    ref_logps[j] = micro_logprobs(module, mb, ids, mask)

    n_rows, n_tokens = ids.shape[0], mask.sum()
    opt, sched = module.optimizers(), module.lr_schedulers()
    row_index = prompt_batch.get("row_index")
    trainer_old: list[torch.Tensor | None] = list(old_logps)
    sums: dict[str, float] = {"loss": 0.0}
    for _ in range(hp.num_iterations):
        opt.zero_grad()
        for j, mb in enumerate(micro):
            logp = micro_logprobs(module, mb, ids, mask)
            if trainer_old[j] is None:  # first pass of num_iterations == 1: nothing has moved yet
                trainer_old[j] = logp.detach()
            weights = None
            if mode is not None:
                weights = rollout_correction_weights(trainer_old[j], sampling_lp[mb.rows], mask[mb.rows], mode,
                                                     hp.rollout_correction_cap)
            loss, m = clipped_policy_loss(logp, old_logps[j], adv[mb.rows], mask[mb.rows], module.loss_config,
                                          ref_logp=ref_logps[j], num_items_in_batch=n_active, world_size=world,
                                          batch_rows=n_rows, batch_tokens=n_tokens, token_weights=weights)
            module.check_finite(loss, "loss", row_index)  # before backward and step
            module.manual_backward(loss)
            sums["loss"] += float(loss.detach()) / hp.num_iterations
            share = float(mask[mb.rows].sum()) / max(float(n_tokens), 1.0) / hp.num_iterations
            for key, v in m.items():  # means over the step's active tokens
                sums[key] = sums.get(key, 0.0) + float(v) * share
        module.check_finite_grad_norm(row_index)
        if hp.max_grad_norm:
            module.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        if sched is not None:
            sched.step()
    if sampling_lp is not None:  # the mismatch is logged whether or not it is corrected
        old = torch.cat(trainer_old, 0)  # (N, C)
        for key, v in rollout_mismatch_metrics(old, sampling_lp, mask, mode, hp.rollout_correction_cap).items():
            sums[key] = float(v)
    sums["micro_batches"] = float(len(micro))
    return sums
