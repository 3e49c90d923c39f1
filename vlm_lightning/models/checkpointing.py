"""Decoder-layer checkpointing of our own: the layer input offloaded to host memory, and a lean recompute.

Two modes of ``gradient_checkpointing`` (``levers.set_checkpointing_mode``) use ``LayerCheckpoint``, an
``autograd.Function`` around each language decoder layer:

  * "lean": every layer is checkpointed (its input kept, its internals recomputed in backward), and the
    recompute skips the frozen base GEMM of the MLP's ``down_proj``. In a pre-norm layer
    (``h = r + down(act(gate(x)) * up(x))``) the value of ``down_proj``'s output is read by nothing the backward
    needs: its input gradient is ``g @ W`` and its LoRA gradients need only its input. So during the recompute
    the base GEMM is replaced by ``_GradOnlyLinear`` (zeros forward, ``g @ W`` backward); the LoRA update still
    runs. At the Qwen2.5-VL-7B shape that GEMM is 29% of a layer's linear FLOPs. Exact: same gradients.
  * "offload": as "lean", and the layer input is copied to pinned host memory on a side stream during the
    forward and brought back in the backward one layer ahead, so the copy overlaps the layer before it (Unsloth's
    "offloaded gradient checkpointing"): the 28 x 4 x 2048 x 3584 bf16 inputs of the 7B shape (1.5 GiB) leave
    the GPU. On the CPU the input is kept as is.

Where the skip does not apply (a post-feedforward norm reads ``down_proj``'s output, as in Gemma 3; LoRA
dropout; a base layer that is neither ``nn.Linear`` nor bitsandbytes 4-bit), the recompute runs the layer's
own forward, so both modes stay exact everywhere. The recompute restores the forward's RNG state.

Limits: the parameters' gradients are accumulated inside the backward (as reentrant checkpointing does), so
DDP runs need ``static_graph``-free hooks as for ``use_reentrant=True``; tested on one device.
Tests: ``tests/models/test_checkpointing.py``; speed: ``benchmarks/bench_sft_step.py`` (arms ``*_lean``,
``*_offload``).
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .patch import swap_forward

_STATE = threading.local()  # .recomputing: True while a LayerCheckpoint backward re-runs its layer
_POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffw_norm")


def _recomputing() -> bool:
    return getattr(_STATE, "recomputing", False)


# ------------------------------------------------------------------------------ the down_proj skip
class _GradOnlyLinear(torch.autograd.Function):
    """``y = zeros`` in forward, ``dx = g @ W`` in backward: a frozen linear whose output value is not needed."""

    @staticmethod
    def forward(ctx, x, weight_fn, out_features: int):  # x: (N, in)
        ctx.weight_fn = weight_fn  # a frozen weight, not an activation: kept off the saved-tensor hooks
        return x.new_zeros(x.shape[0], out_features)  # (N, out)

    @staticmethod
    def backward(ctx, g):  # g: (N, out)
        w = ctx.weight_fn()  # (out, in)
        return g @ w.to(g.dtype), None, None


def _frozen_weight_fn(base: nn.Module):
    """A callable giving ``base``'s frozen (out, in) weight (dequantized for bitsandbytes 4-bit), or None."""
    weight = getattr(base, "weight", None)
    if weight is None or weight.requires_grad:
        return None
    if type(base) is nn.Linear:
        return lambda: weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and type(weight).__name__ == "Params4bit":
        import bitsandbytes.functional as bnbf  # optional dependency: only 4-bit bases reach here

        return lambda: bnbf.dequantize_4bit(weight.data, quant_state)
    return None


def _skip_ok(layer: nn.Module, x: torch.Tensor, args, kwargs) -> bool:
    if args or kwargs or layer.disable_adapters or layer.merged:
        return False
    for name in layer.active_adapters:
        if name in layer.lora_A and (name in getattr(layer, "lora_variant", {})
                                     or not isinstance(layer.lora_dropout[name], nn.Identity)
                                     or layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None):
            return False
    return True


def _make_skip_forward(original):
    def forward(self, x, *args, **kwargs):
        weight_fn = _frozen_weight_fn(self.base_layer) if _recomputing() else None
        if weight_fn is None or not _skip_ok(self, x, args, kwargs):
            return original(self, x, *args, **kwargs)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        out = _GradOnlyLinear.apply(x2, weight_fn, self.base_layer.out_features)  # (N, out), zeros
        for name in self.active_adapters:
            if name in self.lora_A:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
                out = out + (x2.to(a.dtype) @ a.t() @ b.t()).to(out.dtype) * self.scaling[name]
        return out.view(*lead, out.shape[-1])
    return forward


def _down_proj(layer: nn.Module) -> nn.Module | None:
    """The LoRA-wrapped ``down_proj`` of a pre-norm decoder layer whose output only feeds the residual."""
    if any(hasattr(layer, n) for n in _POST_MLP_NORMS):
        return None
    mlp = next((getattr(layer, a) for a in ("mlp", "feed_forward") if hasattr(layer, a)), None)
    down = getattr(mlp, "down_proj", None)
    return down if down is not None and hasattr(down, "lora_A") and hasattr(down, "base_layer") else None


# ------------------------------------------------------------------------------ the layer checkpoint
class _Saved:
    """One offloaded layer input: its pinned host copy, the copy's event, and a link to the layer before it in
    the same forward pass (whose input the backward brings back early, while this layer's backward runs)."""

    __slots__ = ("host", "done", "gpu", "ready", "prev")

    def __init__(self, host, done, prev):
        self.host, self.done, self.gpu, self.ready, self.prev = host, done, None, None, prev


class _HostStash:
    """Layer inputs to pinned host memory and back, on one side stream. A buffer per saved input (torch's
    pinned-memory cache reuses them across steps), so several forwards before one backward stay correct."""

    def __init__(self):
        self.stream = None
        self.last = None  # the _Saved of the layer run last in the current forward pass

    def __deepcopy__(self, memo):  # a copied model (e.g. a reference policy) gets a stash of its own
        return _HostStash()

    def __getstate__(self):  # streams and pinned buffers are not pickled
        return {}

    def __setstate__(self, state):
        self.__init__()

    def save(self, key: int, x: torch.Tensor) -> _Saved:  # x: (B, T, d) on the GPU
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=x.device)
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        x.record_stream(self.stream)  # x's memory is not reused before the copy has read it
        self.last = _Saved(host, done, self.last if key > 0 else None)
        return self.last

    def _fetch(self, saved: _Saved, device) -> None:
        """Start the host-to-device copy of ``saved`` on the side stream (once)."""
        if saved.gpu is not None or saved.host is None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(saved.done)
            saved.gpu = saved.host.to(device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(self.stream)
        saved.host = None

    def load(self, saved: _Saved, device) -> torch.Tensor:
        """The layer input back on ``device``; prefetches the previous layer's input behind it."""
        self._fetch(saved, device)
        current = torch.cuda.current_stream(device)
        current.wait_event(saved.ready)
        x = saved.gpu
        x.record_stream(current)  # allocated on the side stream, used and freed on this one
        saved.gpu = saved.ready = None
        if saved.prev is not None:
            self._fetch(saved.prev, device)
            saved.prev = None
        return x


class LayerCheckpoint(torch.autograd.Function):
    """Run ``run(hidden)`` without autograd; in backward, re-run it (lean) and backpropagate through it."""

    @staticmethod
    def forward(ctx, hidden, run, stash, key, offload):  # hidden: (B, T, d)
        ctx.run, ctx.device = run, hidden.device
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None)
        ctx.stash = stash if offload and hidden.is_cuda else None
        ctx.saved = ctx.stash.save(key, hidden) if ctx.stash is not None else hidden
        return run(hidden)

    @staticmethod
    def backward(ctx, grad):  # grad: (B, T, d)
        hidden = ctx.stash.load(ctx.saved, ctx.device) if ctx.stash is not None else ctx.saved
        hidden = hidden.detach().requires_grad_(True)
        devices = [ctx.device] if ctx.rng[1] is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng[0])
            if ctx.rng[1] is not None:
                torch.cuda.set_rng_state(ctx.rng[1], ctx.device)
            _STATE.recomputing = True
            try:
                out = ctx.run(hidden)
            finally:
                _STATE.recomputing = False
        torch.autograd.backward(out, grad)
        ctx.run = ctx.saved = ctx.stash = None
        return hidden.grad, None, None, None, None


def _make_layer_forward(original):
    def forward(self, hidden_states, *args, **kwargs):
        stash, key, offload = self._vlm_checkpoint  # per layer (the swapped class is shared by all layers)
        if not (self.training and torch.is_grad_enabled()):
            return original(self, hidden_states, *args, **kwargs)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise ValueError(f"gradient_checkpointing='offload'/'lean': {type(self).__name__} got a "
                                 "tensor argument besides hidden_states that requires grad; use 'full'")
        single = {}

        def run(h):
            out = original(self, h, *args, **kwargs)
            single["tuple"] = isinstance(out, tuple)
            return out[0] if single["tuple"] else out

        if not hidden_states.requires_grad:  # LoRA weights inside still need a graph to hang on
            hidden_states = hidden_states.detach().requires_grad_(True)
        out = LayerCheckpoint.apply(hidden_states, run, stash, key, offload)
        return (out,) if single.get("tuple") else out
    return forward


def checkpoint_layers(layers, offload: bool) -> int:
    """Swap each decoder layer's forward for ``LayerCheckpoint`` ("offload" if ``offload`` else "lean") and the
    LoRA ``down_proj`` of each pre-norm layer for the recompute skip. Returns how many layers skip the GEMM.

    Example:
        >>> checkpoint_layers(unwrap_model(peft_model).model.language_model.layers, offload=True)
        28
    """
    stash = _HostStash()
    skipped = 0
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = False  # HF's own checkpointing would wrap ours a second time
        layer._vlm_checkpoint = (stash, i, offload)
        swap_forward(layer, "layer_checkpoint", _make_layer_forward)
        down = _down_proj(layer)
        if down is not None:
            swap_forward(down, "recompute_skip", _make_skip_forward)
            skipped += 1
    return skipped
