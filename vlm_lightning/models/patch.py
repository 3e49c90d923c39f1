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

Each patched module gets a subclass of its own class (``Fused<Name>``, through ``swap_forward``: the one
patching mechanism, which the levers of ``levers.py`` and the fused LoRA forward of ``lora.py`` use too), so
``isinstance`` checks, state dict keys, PEFT wrapping and gradient checkpointing are unchanged; a second call
is a no-op. Unpatched models in the same process are not affected. The ops themselves live in
``vlm_lightning.kernels``, the loss in ``vlm_lightning.losses.sft``.

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
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlm_lightning.kernels import apply_rope, gated_act, layer_norm, rms_norm
from vlm_lightning.losses.sft import token_loss

from .hf import final_logit_softcap, forward_source, lm_head_weight, unwrap_model

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- the one mechanism
_PATCHED = "_vlm_patched"  # the tags a swapped class carries, oldest first
_KERNEL_KINDS = ("rms_norm", "layer_norm", "mlp", "rope", "cross_entropy")
_SUBCLASSES: dict = {}


def swap_forward(module: nn.Module, tag: str, make_forward, name: str | None = None) -> bool:
    """Give ``module`` a cached subclass of its class whose forward is ``make_forward(original)``.

    ``original(self, *args, **kwargs)`` is the forward of the class being replaced, so swaps stack (a lever on
    a kernel-patched module runs the patched forward). One subclass per (class, tag), registered here by name
    (picklable), named ``name`` or the class's own name; ``isinstance``, state dict keys, PEFT wrapping and
    ``copy.deepcopy`` are unchanged. The kernels (``apply_kernels``) and the levers (``models.levers``, the
    fused LoRA forward of ``models.lora``) all patch through here. False (nothing done) if ``tag`` is applied.

    Example:
        >>> swap_forward(model.model.visual, "no_grad", lambda original: torch.no_grad()(original))
        True
    """
    cls = type(module)
    if tag in getattr(cls, _PATCHED, ()):
        return False
    key = (cls, tag)
    if key not in _SUBCLASSES:
        inner = make_forward(cls.forward)

        def forward(self, *args, **kwargs):
            return inner(self, *args, **kwargs)

        # keep the original signature visible (generate() validates model kwargs against forward's)
        forward = functools.wraps(cls.forward)(forward)
        attrs = {"forward": forward, _PATCHED: (*getattr(cls, _PATCHED, ()), tag)}
        if isinstance(module, PreTrainedModel):
            # transformers keys a model's output recorders (output_hidden_states, ...) on str(model.__class__),
            # i.e. module + qualname: the subclass keeps those of the class it replaces, so they are still found
            attrs.update(__module__=cls.__module__, __qualname__=cls.__qualname__)
            sub = type(name or cls.__name__, (cls,), attrs)
        else:  # registered here by a name of its own, so a pickled module finds its class again
            qual = f"_{tag}_{cls.__module__.replace('.', '_')}_{cls.__qualname__}"
            attrs.update(__module__=__name__, __qualname__=qual)
            sub = type(name or cls.__name__, (cls,), attrs)
            globals()[qual] = sub
        _SUBCLASSES[key] = sub
    module.__class__ = _SUBCLASSES[key]
    return True


def unpatched_class(module: nn.Module) -> type:
    """The class ``module`` had before any ``swap_forward`` (the first class of its MRO that is not a swap)."""
    return next(cls for cls in type(module).__mro__ if _PATCHED not in vars(cls))


def patched_tags(module: nn.Module) -> tuple[str, ...]:
    """The tags ``swap_forward`` applied to ``module``'s class, oldest first (empty: an unpatched module)."""
    return getattr(type(module), _PATCHED, ())


def _fused_kind(module: nn.Module) -> str | None:
    return next((t for t in patched_tags(module) if t in _KERNEL_KINDS), None)


def _fuse(module: nn.Module, kind: str, forward) -> None:
    """Swap in one of the kernels' forwards (which never call the original) as ``Fused<Name>``."""
    swap_forward(module, kind, lambda original: forward, name=f"Fused{type(module).__name__}")


# ------------------------------------------------------------------------------------------- norms
_LLAMA_RMS = "returnself.weight*hidden_states.to(input_dtype)"
_GEMMA_RMS = "output*(1.0+self.weight.float())"


def _rms_kind(module: nn.Module) -> str | None:
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), nn.Parameter):
        return None
    src = forward_source(type(module).forward)
    if _LLAMA_RMS in src and hasattr(module, "variance_epsilon"):
        return "llama"
    if _GEMMA_RMS in src and hasattr(module, "eps"):
        return "gemma"
    return None


def rms_norm_kind(module: nn.Module) -> str | None:
    """"llama" or "gemma" when ``module`` is an unpatched HF RMSNorm that the fused ``rms_norm`` reproduces
    (with that casting), else None (also for an already patched one)."""
    return _rms_kind(module)


def gated_mlp_act(module: nn.Module) -> str | None:
    """The ``gated_act`` activation ("swiglu" / "geglu_tanh") of an unpatched HF gated MLP
    (``down(act(gate(x)) * up(x))``), else None."""
    return _mlp_kind(module)


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
    if not _MLP_RE.search(forward_source(type(module).forward)) or not hasattr(module, "act_fn"):
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
    if not type(module).__name__.endswith("Attention") or _ROPE_CALL not in forward_source(type(module).forward):
        return None
    mod = sys.modules.get(type(module).__module__)
    return mod if mod is not None and callable(getattr(mod, "apply_rotary_pos_emb", None)) else None


def _install_rope_dispatcher(mod) -> None:
    fn = mod.apply_rotary_pos_emb
    if getattr(fn, "_vlm_original", None) is None:
        mod.apply_rotary_pos_emb = _rope_dispatcher(fn)


def _rope_attention(original):
    def forward(self, *args, **kwargs):
        _rope_state.depth = getattr(_rope_state, "depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _rope_state.depth -= 1

    return forward


# -------------------------------------------------------------------------------- lm_head + loss
_LM_NEEDS = ("self.model(", "self.lm_head(", "self.loss_function(")


def _lm_loss_forward(original):
    def forward(self, *args, **kwargs):
        run = original.__get__(self, type(self))
        if args:  # bind positionals (input_ids, attention_mask, ...) to their names
            params = list(inspect.signature(run).parameters)
            kwargs.update(zip(params, args))
        labels = kwargs.get("labels")
        weight = lm_head_weight(self)
        if labels is None or not self.training or weight is None:
            return run(**kwargs)
        kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        kwargs.pop("return_dict", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        if "labels" in inspect.signature(self.model.forward).parameters:  # Gemma 3 builds its mask from labels
            kwargs["labels"] = labels
        out = self.model(**kwargs)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state  # (B, T, H)
        loss = token_loss(hidden, labels, weight, softcap=final_logit_softcap(self), normalizer=num_items, fused=True)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
                                      hidden_states=getattr(out, "hidden_states", None),
                                      attentions=getattr(out, "attentions", None))

    return forward


def _lm_patchable(base: nn.Module) -> bool:
    src = forward_source(type(base).forward)
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
        kind = _fused_kind(module)
        if kind is not None:
            counts[kind] += 1
            continue
        if rms_norm and (rk := _rms_kind(module)) is not None:
            _fuse(module, "rms_norm", _rms_llama_forward if rk == "llama" else _rms_gemma_forward)
            counts["rms_norm"] += 1
        elif layer_norm and type(module) is nn.LayerNorm:
            _fuse(module, "layer_norm", _layer_norm_forward)
            counts["layer_norm"] += 1
        elif mlp and (act := _mlp_kind(module)) is not None:
            module._vlm_act = act
            _fuse(module, "mlp", _mlp_forward)
            counts["mlp"] += 1
        elif rope and (mod := _rope_module(module)) is not None:
            _install_rope_dispatcher(mod)
            swap_forward(module, "rope", _rope_attention, name=f"Fused{type(module).__name__}")
            counts["rope"] += 1
    if cross_entropy and _fused_kind(base) is None and _lm_patchable(base):
        swap_forward(base, "cross_entropy", _lm_loss_forward, name=f"Fused{type(base).__name__}")
        counts["cross_entropy"] = 1
    elif _fused_kind(base) is not None:
        counts["cross_entropy"] = 1
    log.info("apply_kernels(%s): %s", type(base).__name__, counts)
    return counts
