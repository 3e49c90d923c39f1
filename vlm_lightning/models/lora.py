"""LoRA from Unsloth-style switches: which part (language / vision / projector) and which modules
(attention / MLP) to adapt, turned into one PEFT target regex from the family table; everything else frozen.

What this file guards against:
  * LoRA landing on the "frozen" vision tower, or missing it: targets are chosen by module *path* under the
    family's language model / vision tower, and the resulting trainable set is exactly those modules.
  * gradient checkpointing killing LoRA gradients: non-reentrant checkpointing, plus input-gradient hooks on
    the text embeddings *and* the vision patch embedding, so vision LoRA gets gradients under either mode.
  * bf16 LoRA silently kept fp32 by PEFT (or 4-bit models upcast wholesale to fp32 by
    ``prepare_model_for_kbit_training``): LoRA weights are cast to the compute dtype (``lora_dtype``), and
    4-bit models are prepared without touching the dtype of the frozen weights.

``fuse_lora_forward`` (a speed lever, exact): PEFT's ``result + lora_B(lora_A(dropout(x))) * scaling`` (two
extra elementwise passes over the (N, out) output forward, one backward, plus a cast when dtypes differ) becomes
``y = base(x); y.addmm_(x @ A^T, B^T, alpha=scaling)``: the update goes into the base GEMM output in place
(cuBLAS beta=1), as Unsloth's ``matmul_lora``. Only for dropout 0, vanilla LoRA (no DoRA/bias), LoRA weights in
the input dtype, no autocast; anything else runs PEFT's own forward.

Example:
    >>> model, processor = load_vlm("Qwen/Qwen2.5-VL-7B-Instruct", quantization="4bit")
    >>> model = apply_lora(model, r=16, finetune_vision_layers=True)      # PeftModel
    >>> model.print_trainable_parameters()
"""
from __future__ import annotations

import logging
import re
from typing import Iterable

import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear as LoraLinear

from .families import get_family_spec
from .hf import compute_dtype, is_quantized, resolve_dtype
from .patch import swap_forward

log = logging.getLogger(__name__)

ATTENTION_TAGS = ("self_attn", "attn", "attention")
MLP_TAGS = ("mlp", "feed_forward", "ffn")
_LORA_PARAM = re.compile(r"\.lora_(A|B|magnitude_vector|embedding_A|embedding_B)\.")


# ------------------------------------------------------------------------------------------ helpers
def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` (incl. bnb ``Linear4bit``/``Linear8bitLt``) that LoRA can wrap, by dotted name.
    Linears owned by ``nn.MultiheadAttention`` are left out: MHA reads ``out_proj.weight`` directly."""
    mha_children = {f"{n}.out_proj" for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in mha_children}


def _under(name: str, prefix: str | None) -> bool:
    return bool(prefix) and (name == prefix or name.startswith(prefix + "."))


def _component(name: str, root: str, attention_leaves: Iterable[str] = (),
               mlp_leaves: Iterable[str] = ()) -> str | None:
    """"attention", "mlp" or None for a linear ``name`` under ``root``: by its leaf name when the family
    table lists it, else by the first attention/MLP-like segment of its path (``attn.qkv``, ``mlp.fc1``)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in attention_leaves:
        return "attention"
    if leaf in mlp_leaves:
        return "mlp"
    for seg in name[len(root) + 1:].split(".")[:-1]:
        if seg in ATTENTION_TAGS:
            return "attention"
        if seg in MLP_TAGS:
            return "mlp"
    return None


def _generalised_pattern(name: str, module_lists: set[str]) -> str:
    """``a.layers.3.mlp.fc1`` -> ``a\\.layers\\.\\d+\\.mlp\\.fc1`` when ``a.layers`` is a ModuleList (layer stacks
    only: the ``0``/``2`` of an ``nn.Sequential`` projector stay literal, its GELU at ``1`` is no target)."""
    parts = name.split(".")
    out = []
    for i, part in enumerate(parts):
        out.append(r"\d+" if part.isdigit() and ".".join(parts[:i]) in module_lists else re.escape(part))
    return r"\.".join(out)


def projector_paths(family_spec) -> tuple[str, ...]:
    """Every projector module path of a family: ``projector`` plus its ``extra_projectors``."""
    return (family_spec.projector, *getattr(family_spec, "extra_projectors", ()))


def _projector_modules(model: nn.Module, family_spec) -> list[str]:
    """``modules_to_save`` entries for the whole projector: a ModuleList (deepstack mergers) by its items."""
    out = []
    for path in projector_paths(family_spec):
        module = model.get_submodule(path)
        out += [f"{path}.{i}" for i in range(len(module))] if isinstance(module, nn.ModuleList) else [path]
    return out


def _in_cross_attention(name: str, family_spec) -> bool:
    """``name`` is a linear inside a decoder layer's cross-attention (Llama 3.2 Vision's ``layers.N.cross_attn``)."""
    cross = getattr(family_spec, "cross_attention", "")
    return bool(cross) and _under(name, family_spec.decoder_layers) and f".{cross}." in name


def select_lora_modules(model: nn.Module, family_spec, finetune_language_layers: bool = True,
                        finetune_vision_layers: bool = False, finetune_attention_modules: bool = True,
                        finetune_mlp_modules: bool = True, finetune_cross_attention: bool = True) -> list[str]:
    """Names of the linear layers the switches select (language decoder layers and/or the vision tower minus
    the projector; attention and/or MLP linears). The cross-attention linears of a cross-attention family
    (Llama 3.2 Vision: q/k/v/o_proj of ``cross_attn``) follow ``finetune_cross_attention`` alone (with or without
    the language layers and the attention switch); the MLPs of its cross-attention layers are language MLPs.
    Raises if a requested part has none."""
    if not (finetune_attention_modules or finetune_mlp_modules):
        raise ValueError("apply_lora: finetune_attention_modules and finetune_mlp_modules are both False: "
                         "no module to adapt (set one, or pass target_modules)")
    wanted = {c for c, on in (("attention", finetune_attention_modules), ("mlp", finetune_mlp_modules)) if on}
    linears = _linear_modules(model)
    selected: list[str] = []
    parts = []
    if finetune_language_layers:
        parts.append(("language", family_spec.decoder_layers, None,
                      tuple(family_spec.attention_modules), tuple(family_spec.mlp_modules)))
    if finetune_vision_layers:
        # the projector (and Qwen3-VL's deepstack mergers) is not part of the vision layers
        parts.append(("vision", family_spec.vision_tower, projector_paths(family_spec),
                      tuple(getattr(family_spec, "vision_attention_modules", ())),
                      tuple(getattr(family_spec, "vision_mlp_modules", ()))))
    for part, root, excluded, attn_leaves, mlp_leaves in parts:
        found = [n for n in linears if _under(n, root) and not any(_under(n, x) for x in excluded or ())
                 and _component(n, root, attn_leaves, mlp_leaves) in wanted and not _in_cross_attention(n, family_spec)]
        if not found:
            raise ValueError(f"apply_lora: no {'/'.join(sorted(wanted))} linear layer under {root!r} for the "
                             f"{part} layers of {type(model).__name__} (family {family_spec.name!r})")
        selected += found
    if finetune_cross_attention:
        selected += [n for n in linears if _in_cross_attention(n, family_spec)]
    return selected


def build_target_regex(model: nn.Module, module_names: Iterable[str]) -> str:
    """One regex (PEFT full-matches it against module names) covering exactly ``module_names``, with the
    layer index of every ModuleList generalised, so it stays short for a 28-layer model."""
    module_lists = {n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)}
    by_parent: dict[str, set[str]] = {}
    for name in module_names:
        parent, _, leaf = _generalised_pattern(name, module_lists).rpartition(r"\.")
        by_parent.setdefault(parent, set()).add(leaf)
    alternatives = [(rf"{parent}\." if parent else "") + (leaves.pop() if len(leaves) == 1 else
                                                          "(?:" + "|".join(sorted(leaves)) + ")")
                    for parent, leaves in sorted(by_parent.items())]
    return "(?:" + "|".join(alternatives) + ")"


def _check_patterns_match(model: nn.Module, target_modules, modules_to_save) -> None:
    """Every user pattern must match at least one module; the error names the pattern."""
    names = [n for n, _ in model.named_modules() if n]
    linears = list(_linear_modules(model))
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, n) for n in linears):
            raise ValueError(f"apply_lora: target_modules regex {target_modules!r} matches no linear layer of "
                             f"{type(model).__name__}")
    elif target_modules is not None:
        for pattern in target_modules:
            if not any(n == pattern or n.endswith("." + pattern) for n in linears):
                raise ValueError(f"apply_lora: target_modules entry {pattern!r} matches no linear layer of "
                                 f"{type(model).__name__}")
    for pattern in modules_to_save or ():
        if not any(n == pattern or n.endswith("." + pattern) for n in names):
            raise ValueError(f"apply_lora: modules_to_save entry {pattern!r} matches no module of "
                             f"{type(model).__name__}")


def _make_output_require_grad(module, inputs, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def _vision_embedding(model: nn.Module, family_spec) -> nn.Module | None:
    """The first module of the vision tower (patch embedding): its output starts the vision activations."""
    try:
        tower = model.get_submodule(family_spec.vision_tower)
    except AttributeError:
        return None
    for attr in ("patch_embed", "embeddings", "patch_conv"):
        if isinstance(getattr(tower, attr, None), nn.Module):
            return getattr(tower, attr)
    return next(iter(tower.children()), None)


def enable_gradient_checkpointing(model: nn.Module, family_spec=None, use_reentrant: bool = False) -> None:
    """Activation checkpointing (non-reentrant by default) with input gradients switched on for the text
    embeddings and the vision patch embedding, so that under *reentrant* checkpointing too every LoRA layer,
    vision ones included, still gets a gradient (transformers PR#41993, peft#2880)."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    hooks = getattr(model, "_vlm_input_grad_hooks", [])
    for h in hooks:
        h.remove()
    targets = [model.get_input_embeddings()]
    if family_spec is not None:
        targets.append(_vision_embedding(model, family_spec))
    model._vlm_input_grad_hooks = [m.register_forward_hook(_make_output_require_grad) for m in targets if m is not None]


def resolve_lora_dtype(model: nn.Module, lora_dtype) -> torch.dtype:
    if lora_dtype in (None, "compute"):
        return compute_dtype(model)
    if isinstance(lora_dtype, torch.dtype):
        return lora_dtype
    return resolve_dtype(lora_dtype)


# ------------------------------------------------------------------------------------------ entry
def apply_lora(model: nn.Module, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0,
               finetune_language_layers: bool = True, finetune_vision_layers: bool = False,
               finetune_attention_modules: bool = True, finetune_mlp_modules: bool = True,
               finetune_projector: bool = False, finetune_cross_attention: bool = True,
               target_modules: str | list[str] | None = None,
               modules_to_save: list[str] | None = None, use_rslora: bool = False, use_dora: bool = False,
               gradient_checkpointing: bool = True, lora_dtype: str | torch.dtype | None = "compute",
               init_lora_weights: bool | str = True, bias: str = "none", use_reentrant: bool = False):
    """Wrap a loaded VLM in a PEFT LoRA model chosen by switches; only LoRA (and ``modules_to_save``) train.

    Args:
        r, lora_alpha, lora_dropout, use_rslora, use_dora, init_lora_weights, bias: PEFT ``LoraConfig``.
        finetune_language_layers / finetune_vision_layers: adapt the decoder layers / the vision tower
            (the projector is not part of the vision layers).
        finetune_attention_modules / finetune_mlp_modules: adapt attention / MLP linears of those parts.
        finetune_cross_attention: adapt the q/k/v/o of the cross-attention layers (Llama 3.2 Vision), the
            text's only path to the image; a no-op for families whose images enter as tokens.
        finetune_projector: train the whole vision->text projector (as a ``modules_to_save`` copy; some
            projectors, e.g. Gemma 3's, have no linear layer to put LoRA on).
        target_modules: overrides the switches: a regex full-matched against module names, or a list of
            module-name suffixes (PEFT semantics). Each must match a linear layer, else ValueError.
        modules_to_save: extra modules trained in full (e.g. ``["lm_head"]``).
        gradient_checkpointing: non-reentrant activation checkpointing (``use_reentrant`` to change).
        lora_dtype: "compute" (the model's compute dtype: bf16 for a bf16 or bf16-compute 4-bit model),
            "float32", or any dtype name. PEFT alone keeps LoRA weights fp32 under a bf16 base.

    Returns:
        The ``PeftModel``; every base parameter has ``requires_grad=False``.

    Example:
        >>> model = apply_lora(model, r=8, finetune_vision_layers=True, finetune_projector=True)
    """
    spec = get_family_spec(model)
    _check_patterns_match(model, target_modules, modules_to_save)
    if target_modules is None:
        names = []
        if finetune_language_layers or finetune_vision_layers or (finetune_cross_attention and spec.cross_attention):
            names = select_lora_modules(model, spec, finetune_language_layers, finetune_vision_layers,
                                        finetune_attention_modules, finetune_mlp_modules, finetune_cross_attention)
        if not names:
            raise ValueError("apply_lora: finetune_language_layers and finetune_vision_layers are both False: "
                             "no LoRA target (train the projector alone with a full fine-tune, or pass "
                             "target_modules)")
        target_modules = build_target_regex(model, names)
    save = list(modules_to_save or [])
    if finetune_projector:
        save += _projector_modules(model, spec)
    save = list(dict.fromkeys(save)) or None

    for p in model.parameters():  # frozen base; PEFT unfreezes only what it adds
        p.requires_grad_(False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, spec, use_reentrant=use_reentrant)
    # 4-bit/8-bit: nothing else to prepare. peft.prepare_model_for_kbit_training would also cast every
    # non-quantised weight (vision tower included) to fp32, which we do not want.

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                        modules_to_save=save, use_rslora=use_rslora, use_dora=use_dora,
                        init_lora_weights=init_lora_weights, bias=bias, task_type="CAUSAL_LM")
    dtype = resolve_lora_dtype(model, lora_dtype)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    for name, p in peft_model.named_parameters():
        if _LORA_PARAM.search(name) and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"apply_lora: nothing is trainable with target_modules={target_modules!r}")
    log.info("apply_lora(%s): %d trainable tensors, LoRA dtype %s", spec.name, len(trainable), dtype)
    return peft_model


def prepare_full_finetune(model: nn.Module, gradient_checkpointing: bool = True, use_reentrant: bool = False):
    """Train every weight (``lora=False``): all parameters trainable, optional activation checkpointing."""
    if is_quantized(model):
        raise ValueError("full fine-tuning of a 4-/8-bit model is not possible: load it in 16 bits "
                         "(quantization: null) or use LoRA")
    for p in model.parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, get_family_spec(model), use_reentrant=use_reentrant)
    return model


# ------------------------------------------------------------------------------------- fused forward
def _fused_lora_ok(layer: nn.Module, x: torch.Tensor, args, kwargs) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}) or not isinstance(layer.lora_dropout[name], nn.Identity):
            return False
        a, b = layer.lora_A[name], layer.lora_B[name]
        if not (isinstance(a, nn.Linear) and isinstance(b, nn.Linear)) or a.bias is not None or b.bias is not None:
            return False
        if a.weight.dtype != x.dtype or b.weight.dtype != x.dtype:
            return False
    return True


def _make_fused_lora_forward(original):
    def forward(self, x, *args, **kwargs):
        if not _fused_lora_ok(self, x, args, kwargs):
            return original(self, x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): 2-D, so the in-place add below needs no view of the output
        out = self.base_layer(x2)  # (N, out)
        if out.dtype != x.dtype or out.dim() != 2:  # e.g. a 4-bit base computing in another dtype
            return original(self, x, *args, **kwargs)
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            xa = x2 @ self.lora_A[name].weight.t()  # (N, r)
            out.addmm_(xa, self.lora_B[name].weight.t(), alpha=self.scaling[name])  # out += s * xa @ B^T
        return out.view(*lead, out.shape[-1])
    return forward


def _lora_linear_classes() -> tuple[type, ...]:
    classes = [LoraLinear]
    try:
        from peft.tuners.lora.bnb import Linear4bit  # optional dependency: bitsandbytes

        classes.append(Linear4bit)
    except ImportError:  # no bitsandbytes
        pass
    return tuple(classes)


def fuse_lora_forward(model: nn.Module) -> int:
    """Swap every PEFT LoRA ``Linear`` (and bitsandbytes ``Linear4bit``) forward for the fused one
    (``y = base(x); y.addmm_(x @ A^T, B^T, alpha=scaling)``). Returns how many layers were swapped.

    The fast path runs only where it is exact: vanilla LoRA, dropout 0, no adapter mixing, LoRA weights in
    the input's dtype, autocast off; otherwise the layer runs PEFT's own forward (same result, slower).

    Example:
        >>> fuse_lora_forward(peft_model)       # 196 for Qwen2.5-VL-7B with LoRA on all LM linears
    """
    classes = _lora_linear_classes()
    n = 0
    for module in model.modules():
        if isinstance(module, classes) and hasattr(module, "lora_A"):
            swap_forward(module, "fused_lora", _make_fused_lora_forward)
            n += 1
    return n
