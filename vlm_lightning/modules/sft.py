"""``VisionSFTModule``: supervised fine-tuning of a VLM (LoRA, QLoRA or full) as a LightningModule.

The constructor is the config schema (LightningCLI turns it into YAML and ``--help``); the HF model is built
in ``configure_model`` so that checkpoint restore, FSDP and meta-device init all see the same code path.

Loss: the mean over supervised (label != -100) tokens of the whole optimizer step. Each micro-batch
backpropagates ``sum of its token losses / c`` with ``c`` fixed for the accumulation window (the first
micro-batch's token count, equal on every rank); ``on_before_optimizer_step`` then rescales the gradients by
``c * accumulate * world_size / total_tokens_of_the_window``. The result equals the gradient of one big batch
holding every micro-batch of every rank, whatever their lengths (``tests/modules/test_sft.py`` proves it),
where a per-micro-batch mean would over-weight short batches. The loss is computed from the decoder's last
hidden state at the supervised positions only, so the (B, T, V) logits are never materialised.

Model building, trainable-only checkpoints, the export block and ``save_adapter`` are the shared base's
(``modules.base.VisionModule``); the loss itself is ``losses.sft.token_loss``, a pure function of the hidden
states, the lm_head and the labels. Throughput (tokens/s, images/s) is logged per optimizer step. A NaN/inf
loss or gradient norm stops training (``nan_guard``, the base's).

Example:
    >>> module = VisionSFTModule("Qwen/Qwen2-VL-2B-Instruct", quantization="4bit", r=16)
    >>> trainer = L.Trainer(precision="bf16-true", max_steps=100, accumulate_grad_batches=4)
    >>> trainer.fit(module, datamodule=VisionChatDataModule("Qwen/Qwen2-VL-2B-Instruct", train="train.jsonl"))
    >>> module.save_adapter("runs/adapter")
"""
from __future__ import annotations

import time
from typing import Any

import torch

from vlm_lightning.losses.sft import token_loss
from vlm_lightning.models.hf import (
    IGNORE_INDEX,
    count_images,
    decoder_hidden_states,
    final_logit_softcap,
    lm_head_weight,
)
from vlm_lightning.models.packing import forward_inputs

from .base import VisionModule

__all__ = ["VisionSFTModule"]


class VisionSFTModule(VisionModule):
    """Supervised fine-tuning of a vision-language model with LoRA, QLoRA or all weights.

    Args:
        model_name_or_path: hub id, local directory, or ``tiny:<name>[@<dir>]`` (see ``models/loading.py``).
        generation_max_new_tokens: default ``max_new_tokens`` of ``generate``.
        **kwargs: the model and optimizer arguments of ``modules.base.VisionModule`` (quantization, dtype,
            lora, r, lora_alpha, finetune_*, gradient_checkpointing, use_kernels, optimizer, scheduler, ...).

    Example:
        >>> module = VisionSFTModule("tiny:qwen2_vl", dtype="float32", r=8)
        >>> module.configure_model(); module.model.print_trainable_parameters()
    """

    def __init__(self, model_name_or_path: str, generation_max_new_tokens: int = 64, **kwargs: Any):
        super().__init__(model_name_or_path, **kwargs)
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.default_max_new_tokens = generation_max_new_tokens
        self._window_norm: torch.Tensor | None = None  # c of the current accumulation window
        self._window_tokens: torch.Tensor | None = None  # supervised tokens seen in the window
        self._window_rows: list | None = None  # row_index of the window's batches (for the NaN guard)
        self._t_last: float | None = None

    # ----------------------------------------------------------------------------------------- loss
    def normalized_loss(self, batch: dict[str, Any], normalizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of supervised token losses / normalizer, number of supervised tokens) for one batch."""
        labels = batch["labels"]
        hf = self.hf_model
        hidden = decoder_hidden_states(hf, forward_inputs(hf, batch), labels)  # (B, T, H); packed: B = 1
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        fused = bool(self.hparams.use_kernels)
        weight = lm_head_weight(hf) if fused else None
        head = weight if weight is not None else hf.get_output_embeddings()
        loss = token_loss(hidden, labels, head, softcap=final_logit_softcap(hf), normalizer=normalizer, fused=fused)
        return loss, n_tokens

    def _sync_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.trainer is not None and self.trainer.world_size > 1:
            return self.trainer.strategy.reduce(value.float(), reduce_op="sum")
        return value.float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        if self._window_norm is None:  # first micro-batch of an optimizer step: fix c (same on every rank)
            world = self.trainer.world_size if self._trainer is not None else 1
            self._window_norm = (self._sync_sum(n_tokens) / world).clamp(min=1.0)
            self._window_tokens = torch.zeros((), device=n_tokens.device)
            self._window_rows = [] if "row_index" in batch else None
        loss, _ = self.normalized_loss(batch, self._window_norm)
        rows = list(batch["row_index"]) if "row_index" in batch else None
        self.check_finite(loss, "loss", rows)  # before backward: no step, no checkpoint after a bad batch
        if self._window_rows is not None and rows is not None:
            self._window_rows.extend(rows)
        self._window_tokens = self._window_tokens + n_tokens
        mean = loss.detach() * self._window_norm / n_tokens.clamp(min=1)  # this micro-batch's token mean
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", mean, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            groups = self.trainer.optimizers[0].param_groups
            self.log("train/lr", groups[0]["lr"], on_step=True, on_epoch=False, batch_size=bs)
            for k, group in enumerate(groups if len(groups) > 1 else ()):  # lr_vision / lr_projector / lr_language
                self.log(f"train/lr_{group.get('name', k)}", group["lr"], on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turn the accumulated ``sum / c`` gradients into the exact token mean of the whole window."""
        if self._window_norm is None:
            return
        total = self._sync_sum(self._window_tokens).clamp(min=1.0)
        scale = self._window_norm * self.trainer.accumulate_grad_batches * self.trainer.world_size / total
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))
        self.check_finite_grad_norm(self._window_rows)
        self._window_norm = None
        self._window_tokens = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._t_last is None:
            self._t_last = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        dt = max(now - self._t_last, 1e-9)
        self._t_last = now
        bs = batch["input_ids"].shape[0]
        tokens = batch["attention_mask"].sum() if "attention_mask" in batch else batch["input_ids"].numel()  # packed
        self.log("train/tokens_per_s", float(tokens) / dt, on_step=True, on_epoch=False, batch_size=bs)
        self.log("train/images_per_s", count_images(batch) / dt, on_step=True, on_epoch=False, batch_size=bs)

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def _eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if "labels" not in batch:  # prompt-only (for_generation) batches: scored by the OCR callback
            return None
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss, _ = self.normalized_loss(batch, n_tokens.clamp(min=1))
        # weighted by tokens, so the epoch value is the token mean over the whole split
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_epoch=True, sync_dist=True,
                 batch_size=max(int(n_tokens), 1))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int):
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int):
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        return self.generate(batch)
