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
``vlm_lightning.modules.grpo_rollout``. Deliberately left out: vLLM / a separate inference engine,
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
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from ..losses.grpo import (
    GRPOLossConfig,
    clipped_policy_loss,
    group_advantages,
)
from ..losses.grpo import (
    mask_truncated_completions as _mask_truncated,
)
from ..rewards.base import compute_rewards, reward_name
from .grpo_rollout import (
    Completions,
    completion_logprobs,
    eos_token_ids,
    model_inputs,
    postprocess_completions,
    sample_completions,
    tile_batch,
    vision_placeholder_ids,
)
from .sft import VisionSFTModule

log = logging.getLogger(__name__)

REFERENCE_ADAPTER = "grpo_reference"


def _nan_stats(x: torch.Tensor) -> tuple[float, float]:
    v = x[~torch.isnan(x)]
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std()) if v.numel() > 1 else 0.0


def _default_grpo_optimizer(params):
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)


class VisionGRPOModule(VisionSFTModule):
    """GRPO-family RL fine-tuning of a LoRA VLM policy with reward callables.

    Model loading, LoRA switches, kernels, trainable-only checkpoints and ``save_adapter`` are
    ``VisionSFTModule``'s (its arguments pass through ``**kwargs``: quantization, dtype, r, lora_alpha,
    finetune_*, use_kernels, gradient_checkpointing, scheduler...). ``use_kernels`` also switches the token
    log-probs to ``fused_linear_token_logprobs`` on the decoder's hidden states.

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
        **kwargs: ``VisionSFTModule`` arguments.
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
        if reward_funcs is None:
            from ..rewards import OCRReward

            reward_funcs = [OCRReward()]
        for fn in reward_funcs:
            if not callable(fn):
                raise TypeError(f"reward_funcs: {fn!r} is not callable")
        if reward_weights is not None and len(reward_weights) != len(reward_funcs):
            raise ValueError(f"{len(reward_weights)} reward_weights for {len(reward_funcs)} reward_funcs")
        self.reward_funcs = list(reward_funcs)
        self.reward_weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
        self.last_samples: list[dict[str, Any]] = []
        self.last_rollout_metrics: dict[str, float] = {}
        self.last_rollout_stats: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        """``VisionSFTModule.configure_model`` (load, kernels, LoRA), then the warm-start adapter, its frozen
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
        from peft import load_peft_weights, set_peft_model_state_dict

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

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

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
                             max_new_tokens: int | None = None) -> tuple[dict, Completions]:
        """Tile ``prompt_batch`` ``num_generations`` times, sample and post-process. Returns the tiled
        batch (tile order: row g * B + b is sample g of prompt b) and the ``Completions``."""
        hp = self.hparams
        tiled = tile_batch(prompt_batch, num_generations)
        inputs = model_inputs(tiled)
        tok = self.tokenizer
        eos = eos_token_ids(self.model, tok)
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
        forbidden = vision_placeholder_ids(self.model.config)
        was_training = self.model.training
        self.model.eval()
        try:
            gen_kwargs = dict(max_new_tokens=max_new_tokens or hp.max_new_tokens, eos_token_ids=eos,
                              pad_token_id=pad, suppress_token_ids=forbidden, stop_strings=hp.stop_strings,
                              tokenizer=tok)
            if hp.rollout_backend != "hf":
                ids = self._fast_rollout(prompt_batch, num_generations, greedy, gen_kwargs)
            elif greedy:
                ids = self._greedy(inputs, **gen_kwargs)
            else:
                ids = sample_completions(self.model, inputs, temperature=hp.temperature, top_p=hp.top_p,
                                         top_k=hp.top_k, min_p=hp.min_p, repetition_penalty=hp.repetition_penalty,
                                         **gen_kwargs)
        finally:
            self.model.train(was_training)
        comp = postprocess_completions(ids, tok, eos, pad, hp.stop_strings, forbidden)
        return tiled, comp

    @torch.no_grad()
    def _fast_rollout(self, prompt_batch: dict, num_generations: int, greedy: bool, gen_kwargs: dict) -> torch.Tensor:
        """``vlm_lightning.rollout.fast_generate`` (LoRA merged while sampling, prefix shared by the G samples,
        static cache + CUDA graph on GPU; HF ``generate`` where unsupported). Same tile order."""
        from vlm_lightning.rollout import fast_generate

        hp = self.hparams
        out = fast_generate(self.model, model_inputs(prompt_batch), num_generations=num_generations,
                            max_new_tokens=gen_kwargs["max_new_tokens"], temperature=0.0 if greedy else hp.temperature,
                            top_p=hp.top_p, eos_token_ids=gen_kwargs["eos_token_ids"],
                            pad_token_id=gen_kwargs["pad_token_id"], stop_strings=hp.stop_strings,
                            tokenizer=self.tokenizer, top_k=hp.top_k,
                            suppress_token_ids=gen_kwargs["suppress_token_ids"],
                            min_p=None if greedy else hp.min_p,
                            repetition_penalty=None if greedy else hp.repetition_penalty,
                            backend=hp.rollout_backend)
        self.last_rollout_stats = {"backend": out.backend, **out.stats}
        return out.completion_ids

    @torch.no_grad()
    def _greedy(self, inputs, max_new_tokens, eos_token_ids, pad_token_id, suppress_token_ids, stop_strings,
                tokenizer) -> torch.Tensor:
        kw = dict(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos_token_ids),
                  pad_token_id=pad_token_id, use_cache=True)
        if suppress_token_ids:
            kw["suppress_tokens"] = list(suppress_token_ids)
        if stop_strings:
            kw.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        out = self.model.generate(**inputs, **kw)
        return out[:, inputs["input_ids"].shape[1]:].long()

    def score(self, tiled: dict, comp: Completions) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards of every completion: (N,) total (NaN where nothing scored) and per-function (N,)."""
        lengths = comp.mask.sum(1).tolist()
        columns = {
            "references": tiled.get("references"),
            "row_index": tiled.get("row_index"),
            "images": tiled.get("images"),
            "completion_ids": [comp.ids[i, :n].tolist() for i, n in enumerate(lengths)],
        }
        columns = {k: v for k, v in columns.items() if v is not None}
        total, per_fn = compute_rewards(self.reward_funcs, self.reward_weights, tiled.get("prompts"), comp.texts,
                                        columns)
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
        bsz = batch["input_ids"].shape[0]
        tiled, comp = self.generate_completions(batch, hp.num_generations)
        rewards, per_fn = self.score(tiled, comp)
        adv = self.advantages(rewards, bsz).to(self.device)
        ids, mask = comp.ids.to(self.device), comp.mask.to(self.device)
        if hp.mask_truncated_completions:
            mask = _mask_truncated(mask, comp.is_truncated.to(self.device))
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
                self.manual_backward(loss)
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for key, v in m.items():
                    sums[key] = sums.get(key, 0.0) + float(v) / (len(micro) * hp.num_iterations)
            if hp.max_grad_norm:
                self.clip_gradients(opt, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            opt.step()
            if sched is not None:
                sched.step()
        sums["loss"] /= hp.num_iterations

        metrics = self._rollout_metrics(rewards, per_fn, adv, comp, bsz)
        metrics.update(sums)
        metrics["lr"] = opt.param_groups[0]["lr"]
        self.last_rollout_metrics = metrics
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if not math.isnan(v)}, on_step=True,
                      prog_bar=False, batch_size=bsz, sync_dist=True)
        self.log("train/reward", metrics["reward/mean"], prog_bar=True, batch_size=bsz, sync_dist=True)
        self._keep_samples(tiled, comp, rewards, adv)
        return torch.tensor(sums["loss"])

    def _rollout_metrics(self, rewards, per_fn, adv, comp: Completions, bsz: int) -> dict[str, float]:
        g = self.hparams.num_generations
        m: dict[str, float] = {}
        m["reward/mean"], m["reward/std"] = _nan_stats(rewards)
        for name, r in per_fn.items():
            m[f"reward/{name}/mean"], m[f"reward/{name}/std"] = _nan_stats(r)
        groups = rewards.view(g, bsz).t()  # (B, G)
        spread = torch.nan_to_num(groups, nan=0.0)
        m["reward/frac_zero_std"] = float(((spread.amax(1) - spread.amin(1)) == 0).float().mean())
        m["advantages/mean"] = float(adv.mean())
        m["advantages/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
        m["advantages/abs_max"] = float(adv.abs().max())
        lengths = comp.mask.sum(1).float()
        m["completions/mean_length"] = float(lengths.mean())
        m["completions/min_length"] = float(lengths.min())
        m["completions/max_length"] = float(lengths.max())
        m["completions/truncated_frac"] = float(comp.is_truncated.float().mean())
        m["completions/rejected_frac"] = float(comp.rejected.float().mean())
        return m

    def _keep_samples(self, tiled, comp: Completions, rewards, adv) -> None:
        hp = self.hparams
        n = min(hp.log_completions, len(comp.texts))
        self.last_samples = [
            {"prompt": (tiled.get("prompts") or [""] * len(comp.texts))[i],
             "completion": comp.texts[i], "reference": (tiled.get("references") or [None] * len(comp.texts))[i],
             "reward": float(rewards[i]), "advantage": float(adv[i]),
             "image": ((tiled.get("images") or [[]] * len(comp.texts))[i] or [None])[0]}
            for i in range(n)
        ]
        if n and self._trainer is not None and self.global_step % max(1, hp.log_completions_every_n_steps) == 0:
            self._log_samples(self.last_samples)

    def _log_samples(self, samples: list[dict[str, Any]]) -> None:
        """Completions (and their first image) to TensorBoard / W&B when attached, else the Python log."""
        logger = self.logger
        exp = getattr(logger, "experiment", None) if logger is not None else None
        step = self.global_step
        try:
            if exp is not None and hasattr(exp, "add_text"):  # TensorBoard
                import numpy as np

                rows = "\n".join(f"| {s['reward']:.3f} | {s['advantage']:+.3f} | `{s['reference']}` | "
                                 f"`{s['completion'][:200]!r}` |" for s in samples)
                exp.add_text("samples", "| reward | adv | reference | completion |\n|---|---|---|---|\n" + rows, step)
                for i, s in enumerate(samples):
                    if s["image"] is not None:
                        exp.add_image(f"samples/image_{i}", np.asarray(s["image"]), step, dataformats="HWC")
                return
            if exp is not None and hasattr(logger, "log_table"):  # W&B
                import wandb

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

    # ---------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict | None, batch_idx: int):
        """Greedy completions scored by the reward functions: logs ``val/reward`` (and per function)."""
        if batch is None:
            return None
        self._check_batch(batch)
        tiled, comp = self.generate_completions(batch, 1, greedy=True, max_new_tokens=self.hparams.val_max_new_tokens)
        rewards, per_fn = self.score(tiled, comp)
        bsz = len(comp.texts)
        mean, _ = _nan_stats(rewards)
        self.log("val/reward", mean, prog_bar=True, batch_size=bsz, sync_dist=True)
        for name, r in per_fn.items():
            self.log(f"val/reward/{name}", _nan_stats(r)[0], batch_size=bsz, sync_dist=True)
        self.log("val/completion_length", float(comp.mask.sum(1).float().mean()), batch_size=bsz, sync_dist=True)
        return None

    def reward_names(self) -> list[str]:
        return [reward_name(f) for f in self.reward_funcs]
