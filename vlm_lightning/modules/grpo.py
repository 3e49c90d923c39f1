"""VisionGRPOModule: GRPO / GSPO / DAPO / Dr.GRPO for vision-language models, with manual optimisation.

One training step = one batch of B prompts (with their images) from a prompt-only dataloader
(``VisionChatDataModule(train_for_generation=True)``):

  1. rollout: the batch is tiled G = ``num_generations`` times and sampled with the LoRA policy
     (``generate``: left padding, EOS ids + stop strings, ``max_new_tokens``, temperature, top-p);
     completions are masked up to and including their first EOS; vision placeholders are suppressed;
  2. score: the reward callables (``vlm_lightning.rewards``) on the decoded text, weighted and summed;
     group advantages (``vlm_lightning.losses.group_advantages``);
  3. reference log-probs (``beta > 0``) from the same model with its adapters disabled (or switched to a
     frozen copy of the warm-start adapter): no second model in memory;
  4. ``num_iterations`` optimiser steps over the rollout (``grpo_step.policy_updates``); each is split into
     micro-batches of whole tiles, sized by tokens, whose gradients accumulate to the one-batch gradient; old
     log-probs are computed only when ``num_iterations > 1``, reference log-probs only when ``beta > 0``; the
     engine's sampling log-probs correct the loss (TIS / MIS, ``rollout_correction``).

With a frozen vision tower the images are encoded once per step and the features reused by every forward of
it (``rollout.vision_cache``: rollout, old / reference log-probs, every policy pass).

``Trainer(max_steps=...)`` counts optimiser steps, i.e. ``num_iterations`` per prompt batch.

The loss math lives in ``vlm_lightning.losses.grpo`` (pure, hand-tested); the rollout pieces in
``vlm_lightning.rollout``. Deliberately left out: vLLM / a separate inference engine,
reward models as ``nn.Module``, multi-turn environments, and TRL's cispo/sapo/luspo/vespo losses.

Example:
    >>> module = VisionGRPOModule("Qwen/Qwen2.5-VL-7B-Instruct", reward_funcs=[OCRReward()],
    ...                           num_generations=8, max_new_tokens=256, loss_type="dapo", beta=0.0)
    >>> dm = VisionChatDataModule("Qwen/Qwen2.5-VL-7B-Instruct", train="ocr.jsonl", batch_size=4,
    ...                           train_for_generation=True)
    >>> L.Trainer(max_steps=200).fit(module, dm)
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from peft import load_peft_weights, set_peft_model_state_dict
from torch import nn

from ..distributed.checks import shards_parameters
from ..losses.grpo import GRPOLossConfig, group_advantages
from ..losses.grpo import (
    mask_truncated_completions as _mask_truncated,
)
from ..models.hf import model_inputs
from ..rewards import OCRReward, RewardSet
from ..rollout import Rollout, generate, tile_batch
from ..rollout.vision_cache import cached_image_features
from .base import VisionModule
from .grpo_report import log_samples, nan_stats, rollout_metrics, sample_rows
from .grpo_step import policy_updates

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "grpo_reference"


def _default_grpo_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class VisionGRPOModule(VisionModule):
    """GRPO-family RL fine-tuning of a LoRA VLM policy with reward callables.

    Model building, LoRA switches, kernels, trainable-only checkpoints and ``save_adapter`` are the shared
    base's, ``modules.base.VisionModule`` (its arguments pass through ``**kwargs``: quantization, dtype, r,
    lora_alpha, finetune_*, scheduler...); nothing comes from the SFT module, whose hooks (token-mean gradient
    rescaling, throughput from the batch) do not fit RL. The SFT speed levers are the same switches with the
    same defaults, applied by ``models.build.build_model``: ``use_kernels`` (also switches the token
    log-probs to ``fused_linear_token_logprobs`` on the decoder's hidden states), ``fused_lora``,
    ``frozen_vision_no_grad``, ``gradient_checkpointing`` (True, False, "mlp", "attention", "every_N"),
    ``compile_layers``; the rollout samples from the same patched model (the fast engine merges LoRA, which
    turns the fused LoRA forward off for the duration). ``train/tokens_per_s`` counts the prompt tokens of
    every tile plus the completions over the whole step (rollout, scoring and updates).

    Args:
        model_name_or_path: hub id, local directory or ``tiny:<name>`` (see ``vlm_lightning.models.load_vlm``).
        reward_funcs: reward callables ``(prompts, completions, **columns) -> list[float | None]``
            (YAML: ``class_path`` entries, e.g. ``vlm_lightning.rewards.OCRReward``). Columns passed:
            ``references``, ``row_index``, ``images``, ``completion_ids``. Default: ``[OCRReward()]``.
        reward_weights: one weight per reward (default 1.0 each).
        adapter_path: start from a trained adapter (e.g. an SFT warm start, saved by ``save_adapter``); the
            LoRA settings must match it. With ``beta > 0`` the reference policy is a frozen copy of this
            adapter, not the bare base (trl#3194).
        num_generations: G, completions per prompt (>= 2).
        max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, stop_strings: sampling.
        rollout_backend: "auto" samples with ``vlm_lightning.rollout.fast_generate`` where the text decoder is
            supported (else HF ``generate``), "fast" requires it, "hf" always uses ``model.generate``.
        loss_type, importance_sampling_level, scale_rewards, epsilon, epsilon_high, delta, beta:
            see ``vlm_lightning.losses.GRPOLossConfig`` (validated at construction).
        mask_truncated_completions: drop completions without EOS from the loss (DAPO overlong filter).
        num_iterations: optimiser steps per rollout (mu in the GRPO paper); > 1 keeps old log-probs.
        generations_per_micro_batch: at most this many of the G tiles (B completions each) go through one
            forward/backward; the micro-batches' gradients accumulate into one optimiser step. None: all G.
        max_tokens_per_micro_batch: at most this many tokens (B x (prompt + the tiles' longest completion))
            per forward/backward of the log-prob and policy passes, whole tiles only (one tile at least; for
            smaller micro-batches use a smaller prompt batch). The loss is normalised by the whole step's
            counts, so the split changes neither loss nor gradient. None: no token cap.
        cache_vision_features: encode each prompt's images once per step and reuse the features in the
            rollout and every log-prob / policy forward (``rollout.vision_cache``; exact). Only when the vision
            tower and the projector are frozen; with a trainable one (vision LoRA, ``finetune_projector``,
            ``lora=False``) every forward runs the tower (the uncached path).
        rollout_correction: "tis" (truncated importance sampling, weight min(rho, cap)), "mis" (masked: tokens
            with rho > cap leave the loss) or None, with rho = exp(logp_trainer_old - logp_rollout) per token,
            the engine's sampling log-probs against the trainer's (``losses.rollout_correction``). "auto": "tis"
            when the fast engine sampled (merged weights; it returns its log-probs), None on the HF path. The
            mismatch (KL, ratio mean/min/max, clipped or masked fraction) is logged under
            ``train/rollout_correction/``.
        rollout_correction_cap: the cap C of "tis" / "mis" (TRL's ``vllm_importance_sampling_cap``).
        max_grad_norm: gradient clipping by norm (None/0: off).
        optimizer: an ``OptimizerCallable`` (default AdamW, lr 1e-5).
        disable_dropout: set every dropout to p=0 so that ratios are exactly 1 and KL exactly 0 before
            the first update (TRL's ``disable_dropout``).
        log_completions: how many sample completions (with their image) to keep in ``last_samples`` and log
            every ``log_completions_every_n_steps`` steps (TensorBoard / W&B / the Python log).
        val_max_new_tokens: greedy decoding length for validation rewards (default ``max_new_tokens``).
        **kwargs: ``VisionModule`` arguments.
    """

    def __init__(
        self,
        model_name_or_path: str,
        reward_funcs: list[Callable] | None = None,
        reward_weights: list[float] | None = None,
        adapter_path: str | None = None,
        num_generations: int = 8,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        min_p: float | None = None,
        repetition_penalty: float | None = None,
        stop_strings: list[str] | None = None,
        rollout_backend: Literal["auto", "fast", "hf"] = "auto",
        loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo",
        importance_sampling_level: Literal["token", "sequence", "sequence_token"] = "token",
        scale_rewards: Literal["group", "batch", "none"] = "group",
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        delta: float | None = None,
        beta: float = 0.0,
        mask_truncated_completions: bool = False,
        num_iterations: int = 1,
        generations_per_micro_batch: int | None = None,
        max_tokens_per_micro_batch: int | None = None,
        cache_vision_features: bool = True,
        rollout_correction: Literal["auto", "tis", "mis"] | None = "auto",
        rollout_correction_cap: float = 2.0,
        max_grad_norm: float | None = 1.0,
        optimizer: OptimizerCallable = _default_grpo_optimizer,
        disable_dropout: bool = True,
        log_completions: int = 2,
        log_completions_every_n_steps: int = 10,
        val_max_new_tokens: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, optimizer=optimizer, **kwargs)
        self.save_hyperparameters(ignore=["reward_funcs", "optimizer", "scheduler"])
        self.automatic_optimization = False
        self.loss_config = GRPOLossConfig(
            num_generations=num_generations, loss_type=loss_type, importance_sampling_level=importance_sampling_level,
            scale_rewards=scale_rewards, epsilon=epsilon, epsilon_high=epsilon_high, delta=delta, beta=beta,
            max_completion_length=max_new_tokens)
        if num_iterations < 1:
            raise ValueError(f"num_iterations={num_iterations}: must be >= 1")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if temperature <= 0:
            raise ValueError(f"temperature={temperature}: GRPO samples, so it must be > 0")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p}: must be in (0, 1]")
        if generations_per_micro_batch is not None and not 1 <= generations_per_micro_batch <= num_generations:
            raise ValueError(f"generations_per_micro_batch={generations_per_micro_batch}: must be in "
                             f"[1, num_generations={num_generations}]")
        if max_tokens_per_micro_batch is not None and max_tokens_per_micro_batch < 1:
            raise ValueError(f"max_tokens_per_micro_batch={max_tokens_per_micro_batch}: must be >= 1 (or None)")
        if rollout_correction not in ("auto", "tis", "mis", None):
            raise ValueError(f"rollout_correction={rollout_correction!r}: expected 'auto', 'tis', 'mis' or None")
        if rollout_correction_cap <= 0:
            raise ValueError(f"rollout_correction_cap={rollout_correction_cap}: must be > 0")
        if beta > 0 and not self.hparams.get("lora", True):
            raise ValueError(f"beta={beta} with lora=False: the reference policy is the model with its adapters "
                             "disabled, which a full fine-tune does not have (it would need a second copy); "
                             "use LoRA or beta=0")
        self.rewards = RewardSet(reward_funcs if reward_funcs is not None else [OCRReward()], reward_weights)
        self.last_samples: list[dict[str, Any]] = []
        self.last_rollout_metrics: dict[str, float] = {}
        self.last_rollout_stats: dict[str, Any] = {}
        self._warned: set = set()  # options already warned about (once per run)
        self.rollout_backend = rollout_backend  # setup may choose "hf" where the fast path cannot run
        self.default_max_new_tokens = val_max_new_tokens or max_new_tokens  # of ``generate`` (OCRMetrics)

    # ------------------------------------------------------------------------------------------ model
    def setup(self, stage: str) -> None:
        """``VisionModule.setup``, then the rollout path: the fast sampler reads (and merges LoRA into) the
        weights outside the strategy's forward, so with sharded parameters (FSDP, ZeRO-3) "auto" uses HF
        ``generate`` and "fast" is refused."""
        super().setup(stage)
        if self._trainer is None or not shards_parameters(self.trainer):
            return
        if self.hparams.rollout_backend == "fast":
            raise ValueError("VisionGRPOModule(rollout_backend='fast') reads (and merges LoRA into) the weights "
                             "outside FSDP's forward, where they are sharded: use rollout_backend='hf' (or 'auto') "
                             "with FSDP.")
        if self.hparams.rollout_backend == "auto":  # "where supported": the fast path is not, with sharded weights
            self.rollout_backend = "hf"
            log.info("VisionGRPOModule: rollouts use HF generate (the fast path needs unsharded weights)")

    def configure_model(self) -> None:
        """``VisionModule.configure_model`` (load, kernels, LoRA), then the warm-start adapter, its frozen
        reference copy (``beta > 0``) and dropout off. Idempotent."""
        if self.model is not None:
            return
        super().configure_model()
        hp = self.hparams
        if hp.adapter_path:
            self._load_warm_start(hp.adapter_path)
        if hp.disable_dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0

    def _load_warm_start(self, path: str) -> None:
        weights = load_peft_weights(path, device="cpu")
        hint = "use the same r / finetune_* / target_modules as the run that saved it"
        try:
            result = set_peft_model_state_dict(self.model, weights, adapter_name="default")
        except RuntimeError as exc:  # shape mismatch (another r)
            raise ValueError(f"adapter_path={path!r} does not match this LoRA setup ({hint}): {exc}") from exc
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and ".default." in k]
        unexpected = list(getattr(result, "unexpected_keys", []))
        if missing or unexpected:
            raise ValueError(f"adapter_path={path!r} does not match this LoRA setup: missing {missing[:4]} "
                             f"(of {len(missing)}), unexpected {unexpected[:4]} (of {len(unexpected)}); {hint}")
        if self.hparams.beta > 0:
            self.model.load_adapter(path, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            self.model.set_adapter("default")
            for n, p in self.model.named_parameters():
                if REFERENCE_ADAPTER in n:
                    p.requires_grad_(False)

    # ---------------------------------------------------------------------------------------- rollout
    @contextlib.contextmanager
    def reference_policy(self):
        """Adapters off (or the frozen warm-start adapter on) for the duration: the reference policy."""
        model = self.model
        if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
            model.set_adapter(REFERENCE_ADAPTER)
            try:
                yield model
            finally:
                model.set_adapter("default")  # also restores requires_grad on the trained adapter
        elif hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield model
        else:
            raise ValueError("beta > 0 needs a PEFT model (adapters to disable) for the reference policy")

    def _check_batch(self, batch: dict) -> None:
        if "labels" in batch or "references" not in batch:
            raise ValueError("VisionGRPOModule needs prompt-only batches (left padded, with 'references'): "
                             "use VisionChatDataModule(train_for_generation=True) or a VisionChatCollator("
                             "for_generation=True)")
        if (batch["attention_mask"][:, -1] == 0).any():
            raise ValueError("prompts must be left padded for batched generation: a right-padded prompt "
                             "continues from its padding (use VisionChatCollator(for_generation=True))")

    def generate_completions(self, prompt_batch: dict, num_generations: int, greedy: bool = False,
                             max_new_tokens: int | None = None) -> tuple[dict, Rollout]:
        """Sample ``num_generations`` completions per prompt (``vlm_lightning.rollout.generate``: fast engine or
        HF ``generate`` per ``rollout_backend``, masked once). Returns the tiled batch (tile order: row g * B + b
        is sample g of prompt b) and the ``Rollout``."""
        hp = self.hparams
        out = generate(self.model, prompt_batch, num_generations, self.tokenizer,
                       max_new_tokens=max_new_tokens or hp.max_new_tokens,
                       temperature=0.0 if greedy else hp.temperature, top_p=hp.top_p, top_k=hp.top_k,
                       min_p=hp.min_p, repetition_penalty=hp.repetition_penalty, stop_strings=hp.stop_strings,
                       backend=self.rollout_backend)
        self.last_rollout_stats = {"backend": out.backend, **out.stats}
        return tile_batch(prompt_batch, num_generations), out

    def score(self, tiled: dict, comp: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards of every completion: (N,) total (NaN where nothing scored) and per-function (N,)."""
        lengths = comp.completion_mask.sum(1).tolist()
        columns = {
            "references": tiled.get("references"),
            "row_index": tiled.get("row_index"),
            "images": tiled.get("images"),
            "completion_ids": [comp.completion_ids[i, :n].tolist() for i, n in enumerate(lengths)],
        }
        columns = {k: v for k, v in columns.items() if v is not None}
        total, per_fn = self.rewards(tiled.get("prompts"), comp.texts, **columns)
        if comp.rejected.any():  # masked out of the loss; left out of the group statistics too
            total = total.clone()
            total[comp.rejected] = float("nan")
        return total, per_fn

    def advantages(self, rewards: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N,) advantages in tile order: regroup per prompt, normalise, and back."""
        g = self.hparams.num_generations
        by_prompt = rewards.view(g, batch_size).t().reshape(-1)  # (B*G,) contiguous groups
        adv = group_advantages(by_prompt, g, self.loss_config.scale_rewards)
        return adv.view(batch_size, g).t().reshape(-1)

    # ------------------------------------------------------------------------------------ training step
    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:  # every row of the batch was skipped by the collator
            return None
        self._check_batch(batch)
        hp = self.hparams
        t0 = time.perf_counter()
        bsz = batch["input_ids"].shape[0]
        with cached_image_features(self.model, model_inputs(batch, self.device), hp.cache_vision_features) as cache:
            tiled, comp = self.generate_completions(batch, hp.num_generations)
            t_rollout = time.perf_counter() - t0
            rewards, per_fn = self.score(tiled, comp)
            adv = self.advantages(rewards, bsz).to(self.device)
            ids, mask = comp.completion_ids.to(self.device), comp.completion_mask.to(self.device)
            if hp.mask_truncated_completions:
                mask = _mask_truncated(mask, comp.truncated.to(self.device))
            n_active = mask.sum()
            world = self.trainer.world_size if self._trainer is not None else 1
            if world > 1:
                n_active = self.trainer.strategy.reduce(n_active.float(), reduce_op="sum")
            sums = policy_updates(self, batch, comp, ids, mask, adv, n_active, world)
        self.last_rollout_stats["vision_cache"] = dict(cache.stats) if cache is not None else None

        metrics = rollout_metrics(rewards, per_fn, adv, comp, hp.num_generations, bsz)
        metrics.update(sums)
        metrics["lr"] = self.optimizers().param_groups[0]["lr"]
        # throughput of the whole step (rollout + scoring + updates): prompt tokens of every tile + completions
        dt = max(time.perf_counter() - t0, 1e-9)
        n_completion = float(comp.completion_mask.sum())
        metrics["tokens_per_s"] = (float(tiled["attention_mask"].sum()) + n_completion) / dt
        metrics["completion_tokens_per_s"] = n_completion / dt
        metrics["time/rollout_s"], metrics["time/step_s"] = t_rollout, dt
        self.last_rollout_metrics = metrics
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if not math.isnan(v)}, on_step=True,
                      prog_bar=False, batch_size=bsz, sync_dist=True)
        self.log("train/reward", metrics["reward/mean"], prog_bar=True, batch_size=bsz, sync_dist=True)
        self.last_samples = sample_rows(tiled, comp, rewards, adv, hp.log_completions)
        if self.last_samples and self._trainer is not None and \
                self.global_step % max(1, hp.log_completions_every_n_steps) == 0:
            log_samples(self.logger, self.last_samples, self.global_step)
        return torch.tensor(sums["loss"])

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict | None, batch_idx: int):
        """Greedy completions scored by the reward functions: logs ``val/reward`` (and per function)."""
        return self._score_greedy(batch, "val")

    def test_step(self, batch: dict | None, batch_idx: int):
        """As ``validation_step``, logged under ``test/``."""
        return self._score_greedy(batch, "test")

    def _score_greedy(self, batch: dict | None, stage: str):
        if batch is None:
            return None
        self._check_batch(batch)
        tiled, comp = self.generate_completions(batch, 1, greedy=True, max_new_tokens=self.hparams.val_max_new_tokens)
        rewards, per_fn = self.score(tiled, comp)
        bsz = len(comp.texts)
        mean, _ = nan_stats(rewards)
        self.log(f"{stage}/reward", mean, prog_bar=stage == "val", batch_size=bsz, sync_dist=True)
        for name, r in per_fn.items():
            self.log(f"{stage}/reward/{name}", nan_stats(r)[0], batch_size=bsz, sync_dist=True)
        self.log(f"{stage}/completion_length", float(comp.completion_mask.sum(1).float().mean()), batch_size=bsz,
                 sync_dist=True)
        return None
