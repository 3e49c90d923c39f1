"""RoPE / M-RoPE kernel (q and k in one launch) against HF's apply_rotary_pos_emb and rotary embeddings."""
import importlib

import pytest
import torch

from vlm_lightning.kernels import apply_rope, apply_rope_from_positions
from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.kernels.reference import rope_cos_sin_ref, rope_ref

needs_triton = pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)")


def _qk(B, T, HQ, HK, D, g):
    # HF layout: projections viewed as (B, T, H, D) then transposed to (B, H, T, D) (not contiguous)
    q = torch.randn(B, T, HQ, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, HK, D, generator=g).transpose(1, 2).requires_grad_()
    return q, k


def _check(out, ref_fn, q, k, g):
    qo, ko = out
    gq, gk = torch.randn(qo.shape, generator=g), torch.randn(ko.shape, generator=g)
    ((qo * gq).sum() + (ko * gk).sum()).backward()
    dq, dk = q.grad.clone(), k.grad.clone()
    q.grad = k.grad = None
    qr, kr = ref_fn()
    ((qr * gq).sum() + (kr * gk).sum()).backward()
    torch.testing.assert_close(qo, qr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ko, kr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk, k.grad, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("B,T,HQ,HK,D,sec,cos_batch", [
    (2, 7, 7, 1, 24, None, 2),            # odd heads, head_dim/2 = 12 (not a power of two), 1-D RoPE
    (1, 5, 28, 4, 128, [16, 24, 24], 1),  # Qwen2.5-VL-7B heads, M-RoPE sections
    (3, 4, 4, 2, 16, [2, 3, 3], 1),       # cos/sin broadcast over the batch (B=1 cos)
])
def test_apply_rope_matches_hf_formula(B, T, HQ, HK, D, sec, cos_batch):
    g = torch.Generator().manual_seed(D + T)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    if sec is None:
        pos = torch.arange(T)[None].expand(cos_batch, T) + torch.arange(cos_batch)[:, None] * 3
    else:
        pos = torch.randint(0, 50, (3, cos_batch, T), generator=g)
    cos, sin = rope_cos_sin_ref(pos, inv, sec)
    q, k = _qk(B, T, HQ, HK, D, g)
    out = apply_rope(q, k, cos, sin)
    assert "RopeFunction" in type(out[0].grad_fn).__name__
    _check(out, lambda: rope_ref(q, k, cos, sin), q, k, g)


@needs_triton
@pytest.mark.parametrize("sec", [None, [2, 3, 3]])
def test_apply_rope_from_positions(sec):
    g = torch.Generator().manual_seed(7)
    B, T, HQ, HK, D = 2, 6, 3, 1, 16
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 40, (3, B, T) if sec else (B, T), generator=g)
    q, k = _qk(B, T, HQ, HK, D, g)
    out = apply_rope_from_positions(q, k, pos, inv, sec, attention_scaling=0.9)
    cos, sin = rope_cos_sin_ref(pos, inv, sec, attention_scaling=0.9)
    _check(out, lambda: rope_ref(q, k, cos, sin), q, k, g)


@needs_triton
def test_matches_hf_qwen2_vl_mrope_cos_sin():
    """HF's own Qwen2-VL rotary embedding + apply_rotary_pos_emb, against ours on its cos/sin."""
    from transformers import AutoConfig
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m

    cfg = AutoConfig.for_model("qwen2_vl", text_config=dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"})).text_config
    rot = m.Qwen2VLRotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(3)
    pos = torch.randint(0, 30, (3, 2, 5), generator=g)
    q, k = _qk(2, 5, 4, 2, 16, g)
    cos, sin = rot(q, pos)
    hf = getattr(m.apply_rotary_pos_emb, "_vlm_original", m.apply_rotary_pos_emb)
    _check(apply_rope(q, k, cos, sin), lambda: hf(q, k, cos, sin), q, k, g)


def test_mrope_section_validated():
    q = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="mrope_section"):
        apply_rope_from_positions(q, q, torch.zeros(3, 1, 3, dtype=torch.long), torch.ones(8), [2, 2, 2])


def _grads(out, q, k, gq, gk):
    q.grad = k.grad = None
    qo, ko = out
    torch.autograd.backward((qo, ko), (gq, gk))
    return qo.detach(), ko.detach(), q.grad.clone(), k.grad.clone()


def _check_dtype(ours, ref_fp32, dtype):
    """fp32: 1e-5. fp16: the kernel rotates in fp32 and rounds once, so it sits within one fp16 rounding of
    the fp32 reference evaluated on the same (fp16) inputs."""
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    for a, b in zip(ours, ref_fp32):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.to(dtype).float(), **tol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("from_pos", [False, True])
@pytest.mark.parametrize("gpu_tiling", [False, True])
def test_mrope_uneven_sections_dtypes(monkeypatch, dtype, from_pos, gpu_tiling):
    """M-RoPE with uneven sections [3, 7, 6] (head_dim 32), 5 q heads / 3 k heads (not powers of two), the
    HF transposed layout; through the cos/sin tables and through the in-kernel angles; with the
    interpreter's token blocks and with the GPU's one token per program."""
    if gpu_tiling:
        ro = importlib.import_module("vlm_lightning.kernels.rope")
        cfg = ro._config
        monkeypatch.setattr(ro, "_config", lambda hq, hk, half, cuda: cfg(hq, hk, half, True))
    B, T, HQ, HK, D, sec = 2, 5, 5, 3, 32, [3, 7, 6]
    g = torch.Generator().manual_seed(21)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 60, (3, B, T), generator=g)
    q = torch.randn(B, T, HQ, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, HK, D, generator=g).to(dtype).transpose(1, 2).requires_grad_()
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    cos, sin = rope_cos_sin_ref(pos, inv, sec)  # fp32 tables
    if from_pos:
        out = apply_rope_from_positions(q, k, pos, inv, sec)
    else:
        out = apply_rope(q, k, cos.to(dtype), sin.to(dtype))
        cos, sin = cos.to(dtype).float(), sin.to(dtype).float()  # what the kernel was given
    assert "RopeFunction" in type(out[0].grad_fn).__name__
    assert out[0].stride() == q.stride() and out[1].stride() == k.stride()
    ours = _grads(out, q, k, gq, gk)
    q32, k32 = q.detach().float().requires_grad_(), k.detach().float().requires_grad_()
    ref = _grads(rope_ref(q32, k32, cos, sin), q32, k32, gq.float(), gk.float())
    _check_dtype(ours, ref, dtype)
    if dtype == torch.float16 and not from_pos:  # and HF's own fp16 arithmetic, within its roundings
        q.grad = k.grad = None
        ref16 = _grads(rope_ref(q, k, cos.half(), sin.half()), q, k, gq, gk)
        for a, b in zip(ours, ref16):
            torch.testing.assert_close(a, b, rtol=4e-3, atol=4e-3)


@needs_triton
def test_rope_layouts_and_unused_output():
    """q/k sliced out of one fused qkv projection (not dense: copied once, output contiguous); batch 1 in
    the HF transposed layout (dense: rotated in place of a copy, output with q's strides); a k output that
    never reaches the loss (its gradient is materialised as zeros by autograd)."""
    g = torch.Generator().manual_seed(4)
    B, T, HQ, HK, D = 1, 6, 4, 2, 16
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    cos, sin = rope_cos_sin_ref(torch.arange(T)[None], inv)
    q1, k1 = _qk(B, T, HQ, HK, D, g)
    out = apply_rope(q1, k1, cos, sin)
    assert out[0].stride() == q1.stride() and out[1].stride() == k1.stride()
    _check(out, lambda: rope_ref(q1, k1, cos, sin), q1, k1, g)
    qkv = torch.randn(B, T, HQ + 2 * HK, D, generator=g)
    q = qkv[:, :, :HQ].transpose(1, 2).requires_grad_()
    k = qkv[:, :, HQ:HQ + HK].transpose(1, 2).requires_grad_()
    _check(apply_rope(q, k, cos, sin), lambda: rope_ref(q, k, cos, sin), q, k, g)
    q.grad = k.grad = None
    qo, ko = apply_rope(q, k, cos, sin)
    gq = torch.randn(qo.shape, generator=g)
    (qo * gq).sum().backward()
    dq = q.grad.clone()
    q.grad = None
    assert torch.count_nonzero(k.grad) == 0
    k.grad = None
    qr, _ = rope_ref(q, k, cos, sin)
    (qr * gq).sum().backward()
    torch.testing.assert_close(dq, q.grad, rtol=1e-5, atol=1e-5)
