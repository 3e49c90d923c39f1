"""``apply_kernels(model)``: swap the HF modules of a loaded VLM for the fused kernels, in place.

Works on module *classes* found in the model, not on a per-family list, so every family we support
(Qwen2-VL, Qwen2.5-VL, LLaVA-NeXT, Pixtral/LLaVA, Gemma 3, Mistral 3 with ministral3 or mistral text)
is covered by the same rules, each checked against the HF source of the module before it is touched:

  RMSNorm      classes named *RMSNorm whose forward is Llama's ``self.weight * x.to(input_dtype)`` or
               Gemma's ``x * (1.0 + self.weight.float())``             -> ``rms_norm`` (llama / gemma casting)
  LayerNorm    ``nn.LayerNorm`` (vision towers)                          -> ``layer_norm`` (forward kernel,
               torch when a gradient is needed)
  gated MLP    modules computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with act_fn = SiLU or
               tanh-GELU (probed numerically)                            -> ``gated_act``
  RoPE         attention modules whose forward calls ``apply_rotary_pos_emb(query_states, key_states,
               cos, sin)``: while *that module* runs, the modeling module's ``apply_rotary_pos_emb`` routes
               to ``apply_rope`` (q and k in one launch; HF already folded M-RoPE's sections into cos/sin)
  lm_head + CE the ``*ForConditionalGeneration`` forward: in training with ``labels``, the loss comes from
               ``fused_linear_cross_entropy`` on the last hidden state (logits are returned as None, as
               Liger does); eval/generation (no labels or ``model.eval()``) runs the original forward.

Each patched module gets a subclass of its own class (``Fused<Name>``), so ``isinstance`` checks, state
dict keys, PEFT wrapping and gradient checkpointing are unchanged; a second call is a no-op. Unpatched
models in the same process are not affected.

Example:
    >>> model, processor = load_vlm("Qwen/Qwen2.5-VL-7B-Instruct")
    >>> apply_kernels(model)                        # or apply_kernels(peft_model)
    >>> loss = model(**batch).loss                  # training step: fused norms, RoPE, MLP and loss
"""
from __future__ import annotations

import functools
import inspect
import logging
import re
import sys
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cross_entropy import fused_linear_cross_entropy
from .gated_mlp import gated_act
from .layer_norm import layer_norm
from .rms_norm import rms_norm
from .rope import apply_rope

log = logging.getLogger(__name__)
_FLAG = "_vlm_fused_kind"


# ----------------------------------------------------------------------------------------- helpers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The HF model under a PeftModel (LoRA layers are injected in place, so patching it patches both)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


_SOURCE_CACHE: dict = {}


def _source(fn) -> str:
    """Whitespace-free source of a function (cached), '' when unavailable."""
    key = getattr(fn, "__code__", fn)
    if key not in _SOURCE_CACHE:
        try:
            _SOURCE_CACHE[key] = re.sub(r"\s+", "", inspect.getsource(fn))
        except (OSError, TypeError):
            _SOURCE_CACHE[key] = ""
    return _SOURCE_CACHE[key]


_SUBCLASSES: dict = {}


def _swap_class(module: nn.Module, kind: str, forward) -> None:
    """Give ``module`` a cached subclass of its class with ``forward`` replaced (picklable by name)."""
    cls = type(module)
    key = (cls, kind)
    if key not in _SUBCLASSES:
        # keep the original signature visible (generate() validates model kwargs against forward's)
        forward = functools.wraps(cls.forward)(_bind_forward(forward))
        name = f"Fused{cls.__name__}"
        qual = f"_{kind}_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        sub = type(name, (cls,), {"forward": forward, _FLAG: kind, "__module__": __name__, "__qualname__": qual})
        globals()[qual] = sub
        _SUBCLASSES[key] = sub
    module.__class__ = _SUBCLASSES[key]


def _bind_forward(fn):
    def forward(self, *args, **kwargs):
        return fn(self, *args, **kwargs)

    return forward


def _is_fused(module: nn.Module) -> bool:
    return getattr(type(module), _FLAG, None) is not None


# ------------------------------------------------------------------------------------------- norms
_LLAMA_RMS = "returnself.weight*hidden_states.to(input_dtype)"
_GEMMA_RMS = "output*(1.0+self.weight.float())"


def _rms_kind(module: nn.Module) -> str | None:
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), nn.Parameter):
        return None
    src = _source(type(module).forward)
    if _LLAMA_RMS in src and hasattr(module, "variance_epsilon"):
        return "llama"
    if _GEMMA_RMS in src and hasattr(module, "eps"):
        return "gemma"
    return None


def _rms_llama_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama")


def _rms_gemma_forward(self, x):
    return rms_norm(x, self.weight, self.eps, 1.0, "gemma")


def _layer_norm_forward(self, x):
    if len(self.normalized_shape) != 1:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
    return layer_norm(x, self.weight, self.bias, self.eps)


# --------------------------------------------------------------------------------------------- MLP
_MLP_RE = re.compile(r"self\.down_proj\(self\.act_fn\(self\.gate_proj\((\w+)\)\)\*self\.up_proj\(\1\)\)")


def _probe_act(act_fn) -> str | None:
    x = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            y = act_fn(x)
    except Exception:  # noqa: BLE001 - an activation we cannot call on CPU is simply not patched
        return None
    if torch.allclose(y, F.silu(x), atol=1e-6):
        return "swiglu"
    if torch.allclose(y, F.gelu(x, approximate="tanh"), atol=1e-6):
        return "geglu_tanh"
    return None


def _mlp_kind(module: nn.Module) -> str | None:
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if not _MLP_RE.search(_source(type(module).forward)) or not hasattr(module, "act_fn"):
        return None
    return _probe_act(module.act_fn)


def _mlp_forward(self, x):
    return self.down_proj(gated_act(self.gate_proj(x), self.up_proj(x), self._vlm_act))


# -------------------------------------------------------------------------------------------- RoPE
_ROPE_CALL = "apply_rotary_pos_emb(query_states,key_states,cos,sin)"
_rope_state = threading.local()


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if getattr(_rope_state, "depth", 0) and not args and not kwargs:
            return apply_rope(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb._vlm_original = original
    return apply_rotary_pos_emb


def _rope_module(module: nn.Module):
    """The modeling module whose ``apply_rotary_pos_emb`` this attention calls, or None."""
    if not type(module).__name__.endswith("Attention") or _ROPE_CALL not in _source(type(module).forward):
        return None
    mod = sys.modules.get(type(module).__module__)
    return mod if mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None)) else None


def _install_rope_dispatcher(mod) -> None:
    fn = mod.apply_rotary_pos_emb
    if getattr(fn, "_vlm_original", None) is None:
        mod.apply_rotary_pos_emb = _rope_dispatcher(fn)


def _attention_forward(self, *args, **kwargs):
    _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
    try:
        return super(type(self), self).forward(*args, **kwargs)
    finally:
        _rope_state.depth -= 1


# -------------------------------------------------------------------------------- lm_head + loss
def _lm_head_weight(model: nn.Module):
    """The lm_head weight (V, H) for the fused loss, or None when the head is not a plain bias-free Linear
    (LoRA on the lm_head, or a bias): callers then compute the loss from materialised logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    if type(head) is nn.Linear and head.bias is None:
        return head.weight
    active = getattr(head, "active_adapter", None)  # PEFT ModulesToSaveWrapper: the trained copy
    saved = getattr(head, "modules_to_save", None)
    if isinstance(saved, nn.ModuleDict) and isinstance(active, str) and active in saved:
        inner = saved[active]
        if type(inner) is nn.Linear and inner.bias is None:
            return inner.weight
    return None


def final_logit_softcap(model: nn.Module) -> float | None:
    """Gemma's final-logit softcap if this model's forward applies it (the text config may carry a value
    that a ``*ForConditionalGeneration`` forward ignores, so the forward's source decides)."""
    base = unwrap_model(model)
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is None or "final_logit_softcapping" not in _source(type(base).forward):
        return None
    return float(cap)


def fused_causal_lm_loss(model: nn.Module, hidden_states: torch.Tensor, labels: torch.Tensor,
                         num_items_in_batch=None, ignore_index: int = -100) -> torch.Tensor:
    """HF's causal-LM loss (shift by one, mean over valid tokens or / num_items_in_batch) computed from the
    last hidden state (B, T, H) and the model's lm_head without materialising the (B, T, V) logits.

    ``model`` may be the HF model or its PeftModel. The final-logit softcap is applied when the model's
    forward applies it. A batch with no valid label gives 0 (HF gives NaN).

    Example:
        >>> out = model.model(**inputs)                 # the decoder, no lm_head
        >>> loss = fused_causal_lm_loss(model, out.last_hidden_state, labels)
    """
    base = unwrap_model(model)
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"fused_causal_lm_loss: hidden states {tuple(hidden_states.shape)} and labels "
                         f"{tuple(labels.shape)} must share the (batch, seq) shape")
    labels = labels.to(hidden_states.device)
    shift = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts token t + 1
    h = hidden_states.reshape(-1, hidden_states.shape[-1])
    weight = _lm_head_weight(base)
    softcap = final_logit_softcap(base)
    if weight is None:  # e.g. LoRA on the lm_head: materialised logits (correct, not memory-lean)
        head = base.get_output_embeddings()
        logits = head(h).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits, shift.reshape(-1), ignore_index=ignore_index, reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else (shift != ignore_index).sum().clamp_min(1)
        return loss / denom
    return fused_linear_cross_entropy(h, weight, shift.reshape(-1), ignore_index=ignore_index,
                                      num_items_in_batch=num_items_in_batch, softcap=softcap)


_LM_NEEDS = ("self.model(", "self.lm_head(", "self.loss_function(")


def _lm_forward(self, *args, **kwargs):
    original = super(type(self), self).forward
    if args:  # bind positionals (input_ids, attention_mask, ...) to their names
        params = list(inspect.signature(original).parameters)
        kwargs.update(zip(params, args))
    labels = kwargs.get("labels")
    if labels is None or not self.training or _lm_head_weight(self) is None:
        return original(**kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kwargs.pop("labels")
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if "labels" in inspect.signature(self.model.forward).parameters:  # Gemma 3 builds its mask from labels
        kwargs["labels"] = labels
    out = self.model(**kwargs)
    hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
    loss = fused_causal_lm_loss(self, hidden, labels, num_items_in_batch=num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                  hidden_states=getattr(out, "hidden_states", None),
                                  attentions=getattr(out, "attentions", None))


def _lm_patchable(base: nn.Module) -> bool:
    src = _source(type(base).forward)
    return isinstance(getattr(base, "model", None), nn.Module) and all(s.replace(" ", "") in src for s in _LM_NEEDS)


# ------------------------------------------------------------------------------------------- entry
def apply_kernels(model: nn.Module, rms_norm: bool = True, rope: bool = True, mlp: bool = True,
                  cross_entropy: bool = True, layer_norm: bool = True) -> dict:
    """Patch ``model`` (HF VLM or its PeftModel) in place with the fused kernels; idempotent.

    Returns a count of patched modules per kind, e.g. {"rms_norm": 57, "mlp": 28, "rope": 28,
    "layer_norm": 0, "cross_entropy": 1} (a second call returns the same counts and changes nothing).
    Call it before or after ``get_peft_model``; LoRA layers inside the MLP / attention keep working since
    only the glue around ``gate_proj``/``up_proj`` and the rotary call change.

    Example:
        >>> counts = apply_kernels(model, cross_entropy=True)
    """
    base = unwrap_model(model)
    counts = {"rms_norm": 0, "layer_norm": 0, "mlp": 0, "rope": 0, "cross_entropy": 0}
    for module in base.modules():
        kind = getattr(type(module), _FLAG, None)
        if kind is not None:
            counts[kind] += 1
            continue
        if rms_norm and (rk := _rms_kind(module)) is not None:
            _swap_class(module, "rms_norm", _rms_llama_forward if rk == "llama" else _rms_gemma_forward)
            counts["rms_norm"] += 1
        elif layer_norm and type(module) is nn.LayerNorm:
            _swap_class(module, "layer_norm", _layer_norm_forward)
            counts["layer_norm"] += 1
        elif mlp and (act := _mlp_kind(module)) is not None:
            module._vlm_act = act
            _swap_class(module, "mlp", _mlp_forward)
            counts["mlp"] += 1
        elif rope and (mod := _rope_module(module)) is not None:
            _install_rope_dispatcher(mod)
            _swap_class(module, "rope", _attention_forward)
            counts["rope"] += 1
    if cross_entropy and not _is_fused(base) and _lm_patchable(base):
        _swap_class(base, "cross_entropy", _lm_forward)
        counts["cross_entropy"] = 1
    elif _is_fused(base):
        counts["cross_entropy"] = 1
    log.info("apply_kernels(%s): %s", type(base).__name__, counts)
    return counts
