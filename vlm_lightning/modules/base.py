"""``VisionModule``: what every vlm-lightning LightningModule does with its model, and nothing about training.

A module is built from ``models.build.build_model`` in ``configure_model`` (so checkpoint restore, FSDP and
meta-device init see one code path), adopts the data module's processor (one processor travels into exports),
saves and restores only the weights that train, records what an export needs, writes adapters, and decodes
answers for prompt-only batches (``generate``, ``predict_step``; what ``OCRMetrics`` calls). The
training logic is each subclass's own: ``VisionSFTModule`` (token loss) and ``VisionGRPOModule`` (rollout,
rewards, policy loss) both extend this base, and neither extends the other.

The constructor is the config schema (LightningCLI turns it into YAML and ``--help``); subclasses pass the
arguments below through ``**kwargs``.

Example:
    >>> class MyModule(VisionModule):
    ...     def training_step(self, batch, batch_idx): ...
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.modules.module import _IncompatibleKeys

from vlm_lightning.distributed.checks import check_module_strategy
from vlm_lightning.export.atomic import atomic_dir
from vlm_lightning.export.base_weights import write_stock_architectures
from vlm_lightning.models.build import build_model
from vlm_lightning.models.families import image_token_id
from vlm_lightning.models.hf import model_inputs, unwrap_model
from vlm_lightning.models.levers import parse_checkpointing
from vlm_lightning.modules.param_groups import component_param_groups
from vlm_lightning.rollout.hf import generate_tokens

__all__ = ["NonFiniteError", "VisionModule"]

_LORA_ARGS = ("r", "lora_alpha", "lora_dropout", "finetune_language_layers", "finetune_vision_layers",
              "finetune_attention_modules", "finetune_mlp_modules", "finetune_projector", "finetune_cross_attention",
              "target_modules", "modules_to_save", "use_rslora", "use_dora", "lora_dtype", "init_lora_weights")


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient norm stopped training (``VisionModule(nan_guard=True)``)."""


def _default_optimizer(params):
    return torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)


def _jsonable(value):
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value, key=str)
    return getattr(value, "value", str(value))  # enums (PeftType, TaskType) -> their string


class VisionModule(L.LightningModule):
    """A vision-language model that trains with LoRA, QLoRA or all weights (the shared base).

    Args:
        model_name_or_path: hub id, local directory, or ``tiny:<name>[@<dir>]`` (see ``models/loading.py``).
        quantization: None (16-bit base), "4bit" (QLoRA: NF4 + double quant) or "8bit"; language model only.
        dtype: dtype of the non-quantised weights and the 4-bit compute dtype ("bfloat16", "float32", ...).
        attn_implementation: "sdpa", "eager", "flash_attention_2" (None: transformers' default).
        lora: True trains LoRA adapters (the switches below); False trains every weight (full fine-tune).
        r, lora_alpha, lora_dropout, use_rslora, use_dora: LoRA hyper-parameters.
        finetune_language_layers, finetune_vision_layers, finetune_attention_modules, finetune_mlp_modules,
        finetune_projector, finetune_cross_attention, target_modules, modules_to_save, lora_dtype,
        init_lora_weights: see ``models.lora.apply_lora`` (``init_lora_weights=False``: random, non-zero B, for tests).
        gradient_checkpointing: non-reentrant activation checkpointing (saves memory, costs ~30% time):
            True/"full" (every decoder layer), False/"none", or a selective mode of ``models.levers``:
            "mlp" / "attention" (only that sub-block of each decoder layer is recomputed), "every_N" (every
            N-th decoder layer is checkpointed, the others keep their activations: faster, more memory),
            "lean" / "offload" (``models.checkpointing``: the recompute skips the frozen ``down_proj`` GEMM;
            "offload" keeps the layer inputs in pinned host memory; one device only: the fastest at <= 20 GiB).
        optimizer: e.g. ``torch.optim.AdamW`` with ``init_args: {lr: 2e-4}`` in YAML (default AdamW lr 2e-4).
        scheduler: an ``LRSchedulerCallable`` stepped every optimizer step, or None.
        lr_vision, lr_projector, lr_language: learning rate of the vision tower's, the projector's and the
            language model's (``lm_head`` included) trainable weights, LoRA weights counting with the module
            they wrap (``modules.param_groups``); None = the optimizer's ``lr``. Any of them set gives the
            optimizer one parameter group per component (named "vision", "projector", "language"; the
            scheduler scales each from its own lr); all None keeps one group.
        use_kernels: patch the model with the fused Triton ops (``models.patch.apply_kernels``) and take the
            loss from the fused linear cross-entropy.
        bnb_4bit_quant_storage: packed 4-bit storage dtype (set to ``dtype`` for FSDP).
        trust_remote_code: passed to ``from_pretrained``.
        frozen_vision_no_grad: run the vision tower under ``torch.no_grad`` when none of its weights trains
            (a trainable projector still trains; turned off automatically for vision LoRA / full fine-tune).
            Exact; saves the frozen tower's recompute and backward under checkpointing.
        fused_lora: LoRA forward ``y = base(x); y.addmm_(x @ A^T, B^T, alpha=scaling)`` (update fused into
            the base GEMM output, no extra elementwise kernels) where exact (dropout 0, no DoRA, LoRA weights
            in the compute dtype, no autocast); elsewhere PEFT's forward.
        compile_layers: ``torch.compile`` each decoder layer (True: inductor, or a backend name); the first
            step pays the compile time.
        nan_guard: stop training with ``NonFiniteError`` (naming the global step and the batch's
            ``row_index``) on a non-finite loss or gradient norm, before the optimizer step, so the last
            checkpoint stays the last good one. False: train on.
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
        finetune_cross_attention: bool = True,
        target_modules: str | list[str] | None = None,
        modules_to_save: list[str] | None = None,
        use_rslora: bool = False,
        use_dora: bool = False,
        lora_dtype: str = "compute",
        init_lora_weights: bool = True,
        gradient_checkpointing: bool | str = True,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        lr_vision: float | None = None,
        lr_projector: float | None = None,
        lr_language: float | None = None,
        use_kernels: bool = False,
        bnb_4bit_quant_storage: str | None = None,
        trust_remote_code: bool = False,
        frozen_vision_no_grad: bool = False,
        fused_lora: bool = False,
        compile_layers: bool | str = False,
        nan_guard: bool = True,
    ):
        super().__init__()
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
        self.default_max_new_tokens = 64  # of ``generate``; subclasses set their own

    # ---------------------------------------------------------------------------------------- model
    def setup(self, stage: str) -> None:
        """Refuse strategy/quantisation combinations that cannot work (FSDP + 4-bit without
        ``bnb_4bit_quant_storage == dtype``) before the model is built, and adopt the data's processor (its
        image-token id is checked against the model config's once both are known)."""
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
            self._check_image_token()

    def configure_model(self) -> None:
        """Build the model (``models.build.build_model``: load, kernels, LoRA or all weights, levers).
        Idempotent."""
        if self.model is not None:
            return
        hp = self.hparams
        mode = parse_checkpointing(hp.gradient_checkpointing)
        if mode in ("lean", "offload") and self._trainer is not None and self.trainer.world_size > 1:
            raise ValueError(f"gradient_checkpointing={mode!r} runs on one device only (its recompute accumulates "
                             "the gradients inside the backward, as reentrant checkpointing does, which is not "
                             "tested with DDP/FSDP/DeepSpeed); use 'full' with a multi-device strategy")
        model, processor = build_model(
            hp.model_name_or_path, quantization=hp.quantization, dtype=hp.dtype,
            attn_implementation=hp.attn_implementation, trust_remote_code=hp.trust_remote_code,
            bnb_4bit_quant_storage=hp.bnb_4bit_quant_storage, use_kernels=hp.use_kernels,
            lora={k: hp[k] for k in _LORA_ARGS} if hp.lora else None,
            gradient_checkpointing=hp.gradient_checkpointing, frozen_vision_no_grad=hp.frozen_vision_no_grad,
            fused_lora=hp.fused_lora, compile_layers=hp.compile_layers)
        self.model = model
        self.processor = self._data_processor if self._data_processor is not None else processor
        self._check_image_token()

    def _check_image_token(self) -> None:
        """Refuse a processor whose image-token id differs from the model config's (``image_token_id`` /
        ``image_token_index``) now, not at the first forward deep inside transformers."""
        config = getattr(self.hf_model, "config", None)
        attr = next((a for a in ("image_token_id", "image_token_index") if getattr(config, a, None) is not None),
                    None)
        proc_id = image_token_id(self.processor) if self.processor is not None else None
        if attr is None or proc_id is None or int(getattr(config, attr)) == proc_id:
            return
        source = ("the data module's processor (get_processor())" if self.processor is self._data_processor
                  else f"the processor loaded from {self.hparams.model_name_or_path!r}")
        raise ValueError(f"image token mismatch: {source} uses image token id {proc_id}, but the model config of "
                         f"{self.hparams.model_name_or_path!r} has {attr}={getattr(config, attr)}; use the "
                         "processor saved with this model (or fix config.json)")

    @property
    def hf_model(self) -> torch.nn.Module:
        """The ``*ForConditionalGeneration`` model under the PeftModel."""
        return unwrap_model(self.model)

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    def forward(self, **inputs):
        return self.model(**inputs)

    def configure_optimizers(self):
        lrs = {c: self.hparams.get(f"lr_{c}") for c in ("vision", "projector", "language")}
        if all(lr is None for lr in lrs.values()):
            params = [p for p in self.model.parameters() if p.requires_grad]
        else:  # one group per component; the optimizer's own lr stays the default of a group without one
            params = component_param_groups(self.model, lrs)
            present = {g["name"] for g in params}
            for component, lr in lrs.items():
                if lr is not None and component not in present:
                    rank_zero_warn(f"lr_{component}={lr} applies to nothing: no {component} weight trains "
                                   "(see the finetune_* switches)")
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------------------------- NaN guard
    def check_finite(self, value: torch.Tensor, what: str, rows: list | None) -> None:
        """Raise ``NonFiniteError`` when ``value`` is NaN/inf (on any rank: every rank raises together) and
        ``nan_guard`` is on. ``rows``: the batch's ``row_index`` values (None: the batch has none)."""
        if not self.hparams.get("nan_guard", True):
            return
        bad = (~torch.isfinite(value.detach().float())).any().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if float(bad) > 0:
            step = self.trainer.global_step if self._trainer is not None else None
            where = f"rows {rows}" if rows is not None else "rows unknown (the batch has no row_index)"
            raise NonFiniteError(f"non-finite {what} ({float(value.detach().float().sum())}) at global step {step}, "
                                 f"batch {where}; training stopped before the optimizer step, so the last "
                                 "checkpoint is the last good one (nan_guard=False trains on)")

    def check_finite_grad_norm(self, rows: list | None) -> None:
        """``check_finite`` on the total 2-norm of the trainable gradients (this rank's shard under FSDP)."""
        if not self.hparams.get("nan_guard", True):
            return
        grads = [p.grad.detach().float().norm() for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.check_finite(torch.stack(grads).norm(), "gradient norm", rows)

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
            raise RuntimeError(f"{type(self).__name__}.load_state_dict: missing trainable keys "
                               f"{missing_trainable[:5]} (of {len(missing_trainable)}), unexpected keys "
                               f"{unexpected[:5]} (of {len(unexpected)}); was the checkpoint made with the same "
                               "LoRA settings?")
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
        for ``lora=False`` the full model. Only global rank zero writes, under a temporary name beside
        ``directory`` that is renamed when complete (an existing folder is replaced).

        Example:
            >>> module.save_adapter("runs/ocr/adapter")
        """
        directory = Path(directory)
        if self._trainer is not None and not self.trainer.is_global_zero:
            return directory
        with atomic_dir(directory) as tmp:  # renamed when complete: an interrupted save leaves no adapter folder
            self.model.save_pretrained(tmp)
            if not self.hparams.lora:  # use_kernels' Fused* class must not name the architecture
                write_stock_architectures(tmp, self.model)
            if self.processor is not None:
                self.processor.save_pretrained(tmp)
        return directory

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
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        was_training = self.model.training
        self.model.eval()
        try:
            budget = max_new_tokens or self.default_max_new_tokens
            new_tokens, _ = generate_tokens(self.model, inputs, max_new_tokens=budget, do_sample=do_sample,
                                            pad_token_id=pad, **kwargs)  # (B, new)
        finally:
            self.model.train(was_training)
        return [t.strip() for t in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[str]:
        return self.generate(batch)
