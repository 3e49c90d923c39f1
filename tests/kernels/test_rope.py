"""RoPE / M-RoPE kernel (q and k in one launch) against HF's apply_rotary_pos_emb and rotary embeddings."""
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
