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
  4. ``num_iterations`` optimiser steps over the rollout; each is split into micro-batches of whole
     tiles whose gradients accumulate; old log-probs are kept when ``num_iterations > 1``.

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
from ..losses.grpo import (
    GRPOLossConfig,
    clipped_policy_loss,
    group_advantages,
)
from ..losses.grpo import (
    mask_truncated_completions as _mask_truncated,
)
from ..models.hf import model_inputs
from ..rewards import OCRReward, RewardSet
from ..rollout import Rollout, completion_logprobs, generate, tile_batch
from .base import VisionModule
from .grpo_report import log_samples, nan_stats, rollout_metrics, sample_rows

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "grpo_reference"


def _default_grpo_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class VisionGRPOModule(VisionModule):
    """GRPO-family RL fine-tuning of a LoRA VLM policy with reward callables.

    Model building, LoRA switches, kernels, trainable-only checkpoints and ``save_adapter`` are the shared
    base's, ``modules.base.VisionModule`` (its arguments pass through ``**kwargs``: quantization, dtype, r,
    lora_alpha, finetune_*, use_kernels, gradient_checkpointing, scheduler...); nothing comes from the SFT
    module, whose hooks (token-mean gradient rescaling, throughput from the batch) do not fit RL.
    ``use_kernels`` also switches the token log-probs to ``fused_linear_token_logprobs`` on the decoder's
    hidden states. ``train/tokens_per_s`` counts the prompt tokens of every tile plus the completions over the
    whole step (rollout, scoring and updates).

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
        generations_per_micro_batch: how many of the G tiles (B completions each) go through one
            forward/backward; the micro-batches' gradients accumulate into one optimiser step. None: all G.
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
        if beta > 0 and not self.hparams.get("lora", True):
            raise ValueError(f"beta={beta} with lora=False: the reference policy is the model with its adapters "
                             "disabled, which a full fine-tune does not have (it would need a second copy); "
                             "use LoRA or beta=0")
        self.rewards = RewardSet(reward_funcs if reward_funcs is not None else [OCRReward()], reward_weights)
        self.last_samples: list[dict[str, Any]] = []
        self.last_rollout_metrics: dict[str, float] = {}
        self.last_rollout_stats: dict[str, Any] = {}
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
    def _micro_batches(self, prompt_batch: dict, n_rows: int, batch_size: int):
        """Slices of whole tiles: (row slice, tiled inputs for those rows)."""
        g = self.hparams.num_generations
        k = self.hparams.generations_per_micro_batch or g
        inputs_k = model_inputs(tile_batch(prompt_batch, k))
        for t0 in range(0, g, k):
            t1 = min(g, t0 + k)
            rows = slice(t0 * batch_size, t1 * batch_size)
            inputs = inputs_k if t1 - t0 == k else model_inputs(tile_batch(prompt_batch, t1 - t0))
            yield rows, {key: v.to(self.device) for key, v in inputs.items()}

    def _logprobs(self, inputs, ids, mask) -> torch.Tensor:
        return completion_logprobs(self.model, inputs, ids, mask, temperature=self.hparams.temperature,
                                   use_kernels=self.hparams.use_kernels)

    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:  # every row of the batch was skipped by the collator
            return None
        self._check_batch(batch)
        hp = self.hparams
        t0 = time.perf_counter()
        bsz = batch["input_ids"].shape[0]
        tiled, comp = self.generate_completions(batch, hp.num_generations)
        rewards, per_fn = self.score(tiled, comp)
        adv = self.advantages(rewards, bsz).to(self.device)
        ids, mask = comp.completion_ids.to(self.device), comp.completion_mask.to(self.device)
        if hp.mask_truncated_completions:
            mask = _mask_truncated(mask, comp.truncated.to(self.device))
        n_active = mask.sum()
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            n_active = self.trainer.strategy.reduce(n_active.float(), reduce_op="sum")
        micro = list(self._micro_batches(batch, ids.shape[0], bsz))

        old_logps: list[torch.Tensor | None] = [None] * len(micro)
        ref_logps: list[torch.Tensor | None] = [None] * len(micro)
        with torch.no_grad():
            for j, (rows, inputs) in enumerate(micro):
                if hp.num_iterations > 1:
                    old_logps[j] = self._logprobs(inputs, ids[rows], mask[rows]).detach()
                if hp.beta > 0:
                    with self.reference_policy():
                        ref_logps[j] = self._logprobs(inputs, ids[rows], mask[rows]).detach()

        opt = self.optimizers()
        sched = self.lr_schedulers()
        sums: dict[str, float] = {}
        for _ in range(hp.num_iterations):
            opt.zero_grad()
            for j, (rows, inputs) in enumerate(micro):
                logp = self._logprobs(inputs, ids[rows], mask[rows])
                loss, m = clipped_policy_loss(logp, old_logps[j], adv[rows], mask[rows], self.loss_config,
                                              ref_logp=ref_logps[j], num_items_in_batch=n_active,
                                              grad_accum_steps=len(micro), world_size=world)
                self.check_finite(loss, "loss", batch.get("row_index"))  # before backward and step
                self.manual_backward(loss)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for key, v in m.items():
                    sums[key] = sums.get(key, 0.0) + float(v) / (len(micro) * hp.num_iterations)
            self.check_finite_grad_norm(batch.get("row_index"))
            if hp.max_grad_norm:
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            if sched is not None:
                sched.step()
        sums["loss"] /= hp.num_iterations

        metrics = rollout_metrics(rewards, per_fn, adv, comp, hp.num_generations, bsz)
        metrics.update(sums)
        metrics["lr"] = opt.param_groups[0]["lr"]
        # throughput of the whole step (rollout + scoring + updates): prompt tokens of every tile + completions
        dt = max(time.perf_counter() - t0, 1e-9)
        n_completion = float(comp.completion_mask.sum())
        metrics["tokens_per_s"] = (float(tiled["attention_mask"].sum()) + n_completion) / dt
        metrics["completion_tokens_per_s"] = n_completion / dt
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
