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

Checkpoints hold only what trains (LoRA weights, ``modules_to_save`` copies; everything for ``lora=False``)
plus optimizer/scheduler/loop state; ``load_state_dict`` restores them onto a freshly built base and
refuses checkpoints that miss a trainable weight.

Example:
    >>> module = VisionSFTModule("Qwen/Qwen2-VL-2B-Instruct", quantization="4bit", r=16)
    >>> trainer = L.Trainer(precision="bf16-true", max_steps=100, accumulate_grad_batches=4)
    >>> trainer.fit(module, datamodule=VisionChatDataModule("Qwen/Qwen2-VL-2B-Instruct", train="train.jsonl"))
    >>> module.save_adapter("runs/adapter")
"""
from __future__ import annotations

import inspect
import json
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.nn.modules.module import _IncompatibleKeys

from vlm_lightning.losses.sft import masked_token_loss

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
# batch keys that are not model inputs (collator extras for generation and bookkeeping)
_NON_MODEL_KEYS = ("labels", "references", "row_index", "images", "prompts")


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


def unwrap_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForConditionalGeneration`` model under a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_inputs(batch: dict[str, Any], device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a collated batch that the model's forward / generate takes (labels excluded)."""
    out = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in _NON_MODEL_KEYS}
    return {k: v.to(device) for k, v in out.items()} if device is not None else out


def count_images(batch: dict[str, Any]) -> int:
    """Images in a collated batch: one row of image_grid_thw / image_sizes, or of pixel_values, per image."""
    for key in ("image_grid_thw", "image_sizes"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    pv = batch.get("pixel_values")
    return int(pv.shape[0]) if isinstance(pv, torch.Tensor) and pv.dim() >= 4 else 0


def final_logit_softcap(hf_model: torch.nn.Module) -> float | None:
    """Gemma-style final-logit softcap, only when this model's forward applies it (Gemma 3's VLM forward
    does not, although its text config may carry a value)."""
    cfg = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None:
        return None
    try:
        applies = "final_logit_softcapping" in inspect.getsource(type(hf_model).forward)
    except (OSError, TypeError):
        applies = True
    return float(cap) if applies else None


def decoder_hidden_states(hf_model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                          labels: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden state (B, T, H) of the multimodal decoder (``hf_model.model``), without the lm_head."""
    inner = hf_model.model
    kwargs = dict(inputs)
    if labels is not None and "labels" in inspect.signature(inner.forward).parameters:
        kwargs["labels"] = labels  # Gemma 3 builds its bidirectional image mask from labels in training
    out = inner(**kwargs, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def supervised_token_loss(hf_model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                          normalizer: float | torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions, divided by ``normalizer``.

    Args:
        hidden: (B, T, H) decoder output; labels: (B, T) with -100 where there is no loss (HF alignment:
            position t predicts labels[t + 1]).
    Returns:
        () fp32. Only the N supervised rows go through the lm_head: (N, V) logits, not (B, T, V).
    """
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]  # (B, T)
    keep = shifted != IGNORE_INDEX
    h = hidden[keep]  # (N, H)
    logits = hf_model.get_output_embeddings()(h)  # (N, V)
    cap = final_logit_softcap(hf_model)
    if cap is not None:
        logits = cap * torch.tanh(logits.float() / cap)
    return masked_token_loss(logits[None], shifted[keep][None], num_items_in_batch=normalizer, shift=False)


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return getattr(value, "value", str(value))  # enums (PeftType, TaskType) -> their string


def _require_kernels():
    try:
        from vlm_lightning.kernels import apply_kernels, fused_causal_lm_loss
    except ImportError as err:  # pragma: no cover - only before the kernels land
        raise RuntimeError("use_kernels=True needs vlm_lightning.kernels (apply_kernels, fused_causal_lm_loss), "
                           f"which failed to import: {err}") from err
    return apply_kernels, fused_causal_lm_loss


class VisionSFTModule(L.LightningModule):
    """Supervised fine-tuning of a vision-language model with LoRA, QLoRA or all weights.

    Args:
        model_name_or_path: hub id, local directory, or ``tiny:<name>[@<dir>]`` (see ``models/loading.py``).
        quantization: None (16-bit base), "4bit" (QLoRA: NF4 + double quant) or "8bit"; language model only.
        dtype: dtype of the non-quantised weights and the 4-bit compute dtype ("bfloat16", "float32", ...).
        attn_implementation: "sdpa", "eager", "flash_attention_2" (None: transformers' default).
        lora: True trains LoRA adapters (the switches below); False trains every weight (full fine-tune).
        r, lora_alpha, lora_dropout, use_rslora, use_dora: LoRA hyper-parameters.
        finetune_language_layers, finetune_vision_layers, finetune_attention_modules, finetune_mlp_modules,
        finetune_projector, target_modules, modules_to_save, lora_dtype, init_lora_weights: see
            ``models.lora.apply_lora`` (``init_lora_weights=False``: random, non-zero B, for tests).
        gradient_checkpointing: non-reentrant activation checkpointing (saves memory, costs ~30% time):
            True/"full" (every decoder layer), False/"none", or a selective mode of ``models.speed``:
            "mlp" / "attention" (only that sub-block of each decoder layer is recomputed), "every_N" (every
            N-th decoder layer is checkpointed, the others keep their activations: faster, more memory).
        frozen_vision_no_grad: run the vision tower under ``torch.no_grad`` when none of its weights trains
            (a trainable projector still trains; turned off automatically for vision LoRA / full fine-tune).
            Exact; saves the frozen tower's recompute and backward under checkpointing.
        fused_lora: LoRA forward ``y = base(x); y.addmm_(x @ A^T, B^T, alpha=scaling)`` (update fused into
            the base GEMM output, no extra elementwise kernels) where exact (dropout 0, no DoRA, LoRA weights
            in the compute dtype, no autocast); elsewhere PEFT's forward.
        compile_layers: ``torch.compile`` each decoder layer (True: inductor, or a backend name); the first
            step pays the compile time.
        optimizer: e.g. ``torch.optim.AdamW`` with ``init_args: {lr: 2e-4}`` in YAML (default AdamW lr 2e-4).
        scheduler: an ``LRSchedulerCallable`` stepped every optimizer step, or None.
        use_kernels: patch the model with ``vlm_lightning.kernels.apply_kernels`` and take the loss from the
            fused linear cross-entropy.
        bnb_4bit_quant_storage: packed 4-bit storage dtype (set to ``dtype`` for FSDP).
        generation_max_new_tokens: default ``max_new_tokens`` of ``generate``.

    Example:
        >>> module = VisionSFTModule("tiny:qwen2_vl", dtype="float32", r=8)
        >>> module.configure_model(); module.model.print_trainable_parameters()
    """

    def __init__(
        self,
        model_name_or_path: str,
        quantization: Literal["4bit", "8bit"] | None = None,
        dtype: str = "bfloat16",
        attn_implementation: str | None = None,
        lora: bool = True,
        r: int = 16,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        finetune_language_layers: bool = True,
        finetune_vision_layers: bool = False,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        finetune_projector: bool = False,
        target_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_dtype: str = "compute",
        init_lora_weights: bool = True,
        gradient_checkpointing: bool | str = True,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        use_kernels: bool = False,
        bnb_4bit_quant_storage: str | None = None,
        trust_remote_code: bool = False,
        generation_max_new_tokens: int = 64,
        frozen_vision_no_grad: bool = False,
        fused_lora: bool = False,
        compile_layers: bool | str = False,
    ):
        super().__init__()
        from vlm_lightning.models.speed import parse_checkpointing

        parse_checkpointing(gradient_checkpointing)  # a bad mode fails here, naming the option
        if quantization is not None and not lora:
            raise ValueError(f"quantization={quantization!r} with lora=False: a quantised base cannot be fully "
                             "fine-tuned; use lora=True (QLoRA) or quantization=null")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.model: torch.nn.Module | None = None
        self.processor = None
        self._data_processor = None  # the data module's processor, adopted in setup (see _adopt_data_processor)
        self.processor_kwargs: dict[str, Any] = {}  # how it differs from the base's (recorded in checkpoints)
        self.strict_loading = False  # checkpoints hold only trainable weights; load_state_dict checks them
        self._window_norm: torch.Tensor | None = None  # c of the current accumulation window
        self._window_tokens: torch.Tensor | None = None  # supervised tokens seen in the window
        self._t_last: float | None = None

    # ---------------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        """Refuse strategy/quantisation combinations that cannot work (FSDP + 4-bit without
        ``bnb_4bit_quant_storage == dtype``) before the model is built; see ``vlm_lightning.strategies``."""
        from vlm_lightning.strategies import check_module_strategy

        check_module_strategy(self)
        self._adopt_data_processor()

    def _adopt_data_processor(self) -> None:
        """One processor travels: use the data module's processor (its pixel bounds) for decoding,
        ``save_adapter`` and the exports, and record its ``processor_kwargs`` in checkpoints."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        get_processor = getattr(dm, "get_processor", None)
        if not callable(get_processor):
            return
        self._data_processor = get_processor()
        self.processor_kwargs = dict(getattr(dm, "processor_kwargs", None) or {})
        if self.model is not None:
            self.processor = self._data_processor

    def configure_model(self) -> None:
        """Load the base, patch kernels, wrap with LoRA (or unfreeze all). Idempotent."""
        if self.model is not None:
            return
        from vlm_lightning.models.loading import load_vlm
        from vlm_lightning.models.lora import apply_lora, prepare_full_finetune
        from vlm_lightning.models.speed import apply_speed_levers, parse_checkpointing

        hp = self.hparams
        checkpointing = parse_checkpointing(hp.gradient_checkpointing)
        model, processor = load_vlm(hp.model_name_or_path, quantization=hp.quantization, dtype=hp.dtype,
                                    attn_implementation=hp.attn_implementation,
                                    trust_remote_code=hp.trust_remote_code,
                                    bnb_4bit_quant_storage=hp.bnb_4bit_quant_storage)
        if hp.use_kernels:
            apply_kernels, _ = _require_kernels()
            apply_kernels(model)
        if hp.lora:
            model = apply_lora(
                model, r=hp.r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                finetune_language_layers=hp.finetune_language_layers,
                finetune_vision_layers=hp.finetune_vision_layers,
                finetune_attention_modules=hp.finetune_attention_modules,
                finetune_mlp_modules=hp.finetune_mlp_modules, finetune_projector=hp.finetune_projector,
                target_modules=hp.target_modules, modules_to_save=hp.modules_to_save, use_rslora=hp.use_rslora,
                use_dora=hp.use_dora, gradient_checkpointing=checkpointing != "none", lora_dtype=hp.lora_dtype,
                init_lora_weights=hp.init_lora_weights)
        else:
            model = prepare_full_finetune(model, gradient_checkpointing=checkpointing != "none")
        if hp.get("frozen_vision_no_grad") or hp.get("fused_lora") or hp.get("compile_layers") or \
                checkpointing not in ("full", "none"):
            apply_speed_levers(model, frozen_vision_no_grad=hp.get("frozen_vision_no_grad", False),
                               fused_lora=hp.get("fused_lora", False), gradient_checkpointing=checkpointing,
                               compile_layers=hp.get("compile_layers", False))
        model.train()  # from_pretrained returns eval mode: no dropout, and HF skips checkpointing in eval
        self.model = model
        self.processor = self._data_processor if self._data_processor is not None else processor
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in model.parameters())
        log.info("VisionSFTModule: %s trainable of %s parameters", f"{n_train:,}", f"{n_all:,}")

    @property
    def hf_model(self) -> torch.nn.Module:
        return unwrap_hf_model(self.model)

    def forward(self, **inputs):
        return self.model(**inputs)

    # ----------------------------------------------------------------------------------------- loss
    def loss_sum(self, batch: dict[str, Any], normalizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of supervised token losses / normalizer, number of supervised tokens) for one batch."""
        labels = batch["labels"]
        inputs = model_inputs(batch)
        hidden = decoder_hidden_states(self.hf_model, inputs, labels)  # (B, T, H)
        n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        if self.hparams.use_kernels:
            _, fused_causal_lm_loss = _require_kernels()
            loss = fused_causal_lm_loss(self.model, hidden, labels, num_items_in_batch=normalizer)
        else:
            loss = supervised_token_loss(self.hf_model, hidden, labels, normalizer)
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
        loss, _ = self.loss_sum(batch, self._window_norm)
        self._window_tokens = self._window_tokens + n_tokens
        mean = loss.detach() * self._window_norm / n_tokens.clamp(min=1)  # this micro-batch's token mean
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", mean, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False,
                     batch_size=bs)
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
        self.log("train/tokens_per_s", batch["attention_mask"].sum().float() / dt, on_step=True, on_epoch=False,
                 batch_size=bs)
        self.log("train/images_per_s", count_images(batch) / dt, on_step=True, on_epoch=False, batch_size=bs)

    def on_train_epoch_start(self) -> None:
        self._t_last = None

    def _eval_step(self, batch: dict[str, Any], stage: str) -> torch.Tensor | None:
        if "labels" not in batch:  # prompt-only (for_generation) batches: scored by the OCR callback
            return None
        n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        loss, _ = self.loss_sum(batch, n_tokens.clamp(min=1))
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

    # ------------------------------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int | None = None, do_sample: bool = False,
                 **kwargs) -> list[str]:
        """Greedy (by default) answers for a prompt-only, left-padded batch (``VisionChatCollator(...,
        for_generation=True)``), decoded with the processor, special tokens dropped.

        Example:
            >>> texts = module.generate(gen_collator(rows), max_new_tokens=16)
        """
        inputs = model_inputs(batch, self.device)
        mask = inputs.get("attention_mask")
        if mask is not None and mask.shape[0] > 1 and not bool(mask[:, -1].all()):
            raise ValueError("generate needs left-padded prompts: build the batch with "
                             "VisionChatCollator(..., for_generation=True)")
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.hparams.generation_max_new_tokens,
                                      do_sample=do_sample, pad_token_id=pad, **kwargs)
        finally:
            self.model.train(was_training)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]  # (B, new)
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    # ----------------------------------------------------------------------------------- checkpoints
    def _trainable_names(self) -> list[str]:
        return [f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the trainable weights (LoRA, ``modules_to_save``; all weights for ``lora=False``)."""
        if self.model is None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        out = OrderedDict() if destination is None else destination
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                out[f"{prefix}model.{name}"] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load trainable weights onto the (freshly built) base: every trainable key must be present; only
        frozen base keys may be missing; unknown keys raise."""
        if self.model is None:
            self.configure_model()
        full = super().state_dict(keep_vars=True)
        unexpected = [k for k in state_dict if k not in full]
        missing_trainable = [k for k in self._trainable_names() if k not in state_dict]
        if unexpected or missing_trainable:
            raise RuntimeError(f"VisionSFTModule.load_state_dict: missing trainable keys {missing_trainable[:5]} "
                               f"(of {len(missing_trainable)}), unexpected keys {unexpected[:5]} "
                               f"(of {len(unexpected)}); was the checkpoint made with the same LoRA settings?")
        super().load_state_dict(state_dict, strict=False, assign=assign)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record what an export needs besides ``state_dict`` (``vlm_lightning.export`` reads only this block,
        never the hyper-parameters): the base, LoRA or full, the PEFT config and the processor kwargs."""
        info = {"model_name_or_path": self.hparams.model_name_or_path, "adapter_only": bool(self.hparams.lora),
                "processor_kwargs": dict(self.processor_kwargs)}
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            # plain JSON types only: Lightning resumes with torch.load(weights_only=True)
            info["peft_config"] = json.loads(json.dumps(peft_config["default"].to_dict(), default=_jsonable))
        checkpoint["vlm_lightning"] = info

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the PEFT adapter (``PeftModel.from_pretrained(base, directory)`` loads it) and the processor;
        for ``lora=False`` the full model. Only global rank zero writes.

        Example:
            >>> module.save_adapter("runs/ocr/adapter")
        """
        directory = Path(directory)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        if not self.hparams.lora:  # use_kernels' Fused* class must not name the architecture
            from vlm_lightning.export.base_weights import write_stock_architectures

            write_stock_architectures(directory, self.model)
        if self.processor is not None:
            self.processor.save_pretrained(directory)
        return directory
