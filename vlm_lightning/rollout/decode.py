"""The fast engine's model side: a prefill with the model's own forward, then a one-token decode step over a
static KV cache, optionally captured in a CUDA graph.

Prefill: the image + prompt go through the HF model once, with the position ids ``generate`` would build
(``model._prepare_position_ids_for_generation``: attention-mask cumsum, or Qwen-VL's 3-D M-RoPE index).
Decode: token k (k = 0 is the first generated token, fed at the second step) sits at the prompt's last
position + 1 + k in every rotary component, which is what ``generate`` does in transformers 5.17 and 5.24
(for Qwen-VL: ``rope_deltas`` + text position); its KV cache index is P + k. The step re-uses the HF modules
(norms, projections, MLPs) and replaces only the attention plumbing: one ``(N, H_kv, P + C, d)`` buffer per
layer, GQA without ``repeat_kv`` (queries grouped per KV head), masks built on device. Left out: text decoders
outside ``SUPPORTED_TEXT_MODEL_TYPES`` and attention logit softcapping (``fast_path_unsupported`` says why;
those go to HF ``generate``).

Example:
    >>> logits, layer_kv, pos = prefill(hf, inputs)                    # (B, V), per-layer KV, positions
    >>> step = DecodeStep(hf, n=B, max_len=P + C, device=dev, dtype=layer_kv[0][0].dtype)
    >>> step.load_prefix(layer_kv, P, repeats=1); step.pos = decode_positions(pos); step()   # step.logits
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import apply_rope, gated_act, rms_norm
from ..models.families import get_family_spec
from ..models.hf import text_config, unwrap_model
from ..models.patch import gated_mlp_act, rms_norm_kind

#: Text decoders whose one-token step ``DecodeStep`` reproduces (checked against transformers 5.17 and 5.24).
SUPPORTED_TEXT_MODEL_TYPES = ("qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text", "gemma3_text", "llama", "mistral",
                              "qwen2")  # qwen3_vl_text: q/k norms; its deepstack features only touch prompt tokens


def _language_model(hf: nn.Module) -> nn.Module:
    inner = getattr(hf, "model", None)
    lm = getattr(inner, "language_model", None)
    if lm is None:
        lm = hf.get_submodule(get_family_spec(hf).language_model)
    return lm


def fast_path_unsupported(model: nn.Module) -> str | None:
    """Why the own decode loop cannot run this model (None: it can)."""
    hf = unwrap_model(model)
    text_cfg = text_config(hf)
    mt = getattr(text_cfg, "model_type", None)
    if mt not in SUPPORTED_TEXT_MODEL_TYPES:
        return f"text decoder {mt!r} not in SUPPORTED_TEXT_MODEL_TYPES"
    if getattr(text_cfg, "attn_logit_softcapping", None) is not None:
        return "attention logit softcapping"
    try:
        lm = _language_model(hf)
    except Exception as exc:  # noqa: BLE001
        return f"no language model found ({exc})"
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(lm, attr):
            return f"language model has no {attr!r}"
    return None



def linear_params(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when ``mod(x)`` is exactly ``F.linear(x, weight, bias)`` right now: a plain ``nn.Linear``,
    or a PEFT LoRA layer over one whose adapters are disabled (as ``merged_lora`` leaves them, with the merged
    weight in the base) or merged. Anything else (active adapters, quantized bases): None."""
    def plain(m):
        return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward

    if plain(mod):
        return mod.weight, mod.bias
    base = getattr(mod, "base_layer", None)
    if base is None or not plain(base):
        return None
    disabled, merged = bool(getattr(mod, "disable_adapters", False)), bool(getattr(mod, "merged", False))
    return (base.weight, base.bias) if disabled != merged else None


def _fused_qkv(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, list[int]] | None:
    """One (Q+K+V, H) weight (and bias) for the attention's three projections, when all are plain linears."""
    params = [linear_params(getattr(attn, n, None)) if isinstance(getattr(attn, n, None), nn.Module) else None
              for n in ("q_proj", "k_proj", "v_proj")]
    if any(p is None for p in params) or len({(p[0].dtype, p[0].device, p[0].shape[1]) for p in params}) != 1:
        return None
    with torch.no_grad():
        weight = torch.cat([p[0] for p in params])
        bias = None
        if any(p[1] is not None for p in params):
            bias = torch.cat([p[1] if p[1] is not None else p[0].new_zeros(p[0].shape[0]) for p in params])
    return weight, bias, [p[0].shape[0] for p in params]


def _norm_fn(norm: nn.Module):
    """The norm as one fused ``rms_norm`` call when it is an unpatched HF RMSNorm (Llama or Gemma casting; the
    kernel falls back to the torch reference where Triton cannot run), else the module itself."""
    kind = rms_norm_kind(norm)
    if kind == "llama":
        return lambda x: rms_norm(x, norm.weight, norm.variance_epsilon, 0.0, "llama")
    if kind == "gemma":
        return lambda x: rms_norm(x, norm.weight, norm.eps, 1.0, "gemma")
    return norm


def _mlp_fn(mlp: nn.Module):
    """``down(act(gate(x)) * up(x))`` with the fused ``gated_act`` when the MLP is an unpatched gated one."""
    act = gated_mlp_act(mlp)
    if act is None:
        return mlp
    return lambda x: mlp.down_proj(gated_act(mlp.gate_proj(x), mlp.up_proj(x), act))


class DecodeStep:
    """One-token step of the text decoder over a static KV cache, from the HF modules themselves.

    ``fuse=True`` (the default) runs the same math with fewer launches: q/k/v as one GEMM over concatenated
    weights (when all three are plain linears, e.g. LoRA merged by ``merged_lora``; one extra copy of those
    weights while the step lives), q and k rotated by one ``apply_rope`` call, RMSNorms and the gated MLP's
    activation through the fused kernels (``vlm_lightning.kernels``, which fall back to their torch
    references off-GPU). ``fuse=False`` calls the HF modules one by one (the reference the tests compare with).

    Static state (buffers read and written in place, so the step can be captured in a CUDA graph):
    ``ids`` (N,) the tokens to feed; ``pos`` rotary positions, (3, N, 1) for M-RoPE else (N, 1); ``idx`` (1,)
    the cache index to write; ``valid`` (N, L) which cache slots hold real tokens (prompt mask, then ones);
    ``keys`` / ``values`` per layer (N, H_kv, L, d); ``logits`` (N, V) float32, the output.
    """

    def __init__(self, hf: nn.Module, n: int, max_len: int, device, dtype, fuse: bool = True):
        self.hf = hf
        self.lm = _language_model(hf)
        self.head = hf.get_output_embeddings()
        text_cfg = text_config(hf)
        self.softcap = getattr(text_cfg, "final_logit_softcapping", None)
        layer_types = getattr(text_cfg, "layer_types", None)
        self.layers = list(self.lm.layers)[: getattr(text_cfg, "num_hidden_layers", len(self.lm.layers))]
        self.layer_types = [layer_types[i] if layer_types else "full_attention" for i in range(len(self.layers))]
        # Mistral's attention reads the window from the config for every layer; the others keep it per layer
        default_window = getattr(text_cfg, "sliding_window", None) if text_cfg.model_type == "mistral" else None
        self.windows = [getattr(layer.self_attn, "sliding_window", default_window) for layer in self.layers]
        params = inspect.signature(self.lm.rotary_emb.forward).parameters
        self.rope_by_type = "layer_type" in params
        self.n, self.max_len, self.device, self.dtype = n, max_len, device, dtype
        self.ar = torch.arange(max_len, device=device)
        self.ids = torch.zeros(n, dtype=torch.long, device=device)
        self.idx = torch.zeros(1, dtype=torch.long, device=device)
        self.valid = torch.zeros(n, max_len, dtype=torch.bool, device=device)
        self.pos: torch.Tensor | None = None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None
        self.fuse = fuse
        norm, mlp = (_norm_fn, _mlp_fn) if fuse else ((lambda m: m), (lambda m: m))

        def optional_norm(layer, name):  # Gemma's norms around the MLP; absent elsewhere
            module = getattr(layer, name, None)
            return norm(module) if module is not None else None

        self.qkv = [_fused_qkv(layer.self_attn) if fuse else None for layer in self.layers]
        self.norms = [(norm(layer.input_layernorm), norm(layer.post_attention_layernorm),
                       optional_norm(layer, "pre_feedforward_layernorm"),
                       optional_norm(layer, "post_feedforward_layernorm")) for layer in self.layers]
        self.mlps = [mlp(layer.mlp) for layer in self.layers]
        self.final_norm = norm(self.lm.norm)

    def load_prefix(self, layer_kv: list[tuple[torch.Tensor, torch.Tensor]], prompt_len: int, repeats: int) -> None:
        """Copy the prefill cache ((B, H_kv, <=P, d) per layer) into the static buffers, tiled ``repeats`` times.
        A sliding-window layer's cache holds only the prompt's last tokens: they go at the end of [0, P)."""
        for k, v in layer_kv:
            b, h, lk, d = k.shape
            kb = torch.zeros(self.n, h, self.max_len, d, dtype=k.dtype, device=self.device)
            vb = torch.zeros_like(kb)
            kb[:, :, prompt_len - lk: prompt_len] = k.repeat(repeats, 1, 1, 1)
            vb[:, :, prompt_len - lk: prompt_len] = v.repeat(repeats, 1, 1, 1)
            self.keys.append(kb)
            self.values.append(vb)

    def _rope(self, h: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for lt in set(self.layer_types):
            out[lt] = self.lm.rotary_emb(h, self.pos, lt) if self.rope_by_type else self.lm.rotary_emb(h, self.pos)
        return out

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def __call__(self) -> None:
        n = self.n
        h = self.lm.embed_tokens(self.ids[:, None])  # (N, 1, H)
        rope = self._rope(h)
        causal = self.valid & (self.ar[None, :] <= self.idx)  # (N, L)
        masks: dict[Any, torch.Tensor] = {None: causal[:, None, None, :]}
        for w in set(self.windows) - {None}:
            masks[w] = (causal & (self.ar[None, :] > self.idx - w))[:, None, None, :]
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            norm_in, norm_post_attn, norm_pre_ff, norm_post_ff = self.norms[i]
            residual = h
            x = norm_in(h)
            d = attn.head_dim
            if self.qkv[i] is not None:
                w, b, splits = self.qkv[i]
                q, k, v = F.linear(x, w, b).split(splits, dim=-1)
            else:
                q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
            q = q.reshape(n, 1, -1, d).transpose(1, 2)  # (N, Hq, 1, d)
            k = k.reshape(n, 1, -1, d).transpose(1, 2)  # (N, Hkv, 1, d)
            v = v.reshape(n, 1, -1, d).transpose(1, 2)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            cos, sin = rope[self.layer_types[i]]  # (N, 1, d)
            if self.fuse:  # one launch for q and k (HF's rotate_half math)
                q, k = apply_rope(q.contiguous(), k.contiguous(), cos, sin)
            else:
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
                q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            kb, vb = self.keys[i], self.values[i]
            kb.index_copy_(2, self.idx, k.to(kb.dtype))
            vb.index_copy_(2, self.idx, v.to(vb.dtype))
            hkv, hq = kb.shape[1], q.shape[1]
            qg = q.reshape(n, hkv, hq // hkv, d)  # query head j reads KV head j // rep, as repeat_kv
            o = F.scaled_dot_product_attention(qg, kb, vb, attn_mask=masks[self.windows[i]], scale=attn.scaling)
            o = attn.o_proj(o.reshape(n, 1, hq * d))
            if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma: norms around both sub-blocks
                h = residual + norm_post_attn(o)
                h = h + norm_post_ff(self.mlps[i](norm_pre_ff(h)))
            else:
                h = residual + o
                h = h + self.mlps[i](norm_post_attn(h))
        h = self.final_norm(h)
        logits = self.head(h[:, -1]).float()  # (N, V)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        if self.logits is None:
            self.logits = torch.empty_like(logits)
        self.logits.copy_(logits)


class GraphedStep:
    """``DecodeStep`` captured once in a CUDA graph; ``__call__`` replays it (all state in static buffers)."""

    def __init__(self, step: DecodeStep, warmup: int = 2):
        self.step = step
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # writes K/V at the current idx, which the first real step overwrites
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()

    def __call__(self) -> None:
        self.graph.replay()


def prefill_positions(hf: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The position ids ``generate`` gives the prompt: (N, P), or (3|4, N, P) for Qwen-VL M-RoPE."""
    ids = inputs["input_ids"]
    prep = getattr(hf, "_prepare_position_ids_for_generation", None)
    if prep is not None:
        kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
        return prep(ids, kwargs)
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(cache[i][0], cache[i][1]) for i in range(len(cache))]


def prefill(hf: nn.Module, inputs: Mapping[str, torch.Tensor]):
    """Model forward on the prompts with a cache: (last-position logits (B, V) fp32, per-layer KV, positions)."""
    pos = prefill_positions(hf, inputs)
    out = hf(**inputs, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None)
    if cache is None:
        cache = out.past_key_values
    logits = out.logits[:, -1].float()
    return logits, _cache_layers(cache), pos


def decode_positions(pos: torch.Tensor) -> torch.Tensor:
    """Rotary positions of the first decode token from the prompt's: (3, B, 1) for M-RoPE, else (B, 1)."""
    if pos.ndim == 3:
        return pos[-3:, :, -1:] + 1  # drop the text-only component of a 4-row Qwen position tensor
    return pos[:, -1:] + 1

