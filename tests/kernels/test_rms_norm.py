"""RMSNorm (Llama and Gemma casting) and LayerNorm-forward kernels against their torch references.

CPU: run with TRITON_INTERPRET=1 (the Triton interpreter, fp32); without it the kernels fall back to the
references and the kernel tests skip.
"""
import pytest
import torch

from vlm_lightning.kernels import layer_norm, rms_norm
from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.kernels.reference import layer_norm_ref, rms_norm_ref

needs_triton = pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)")


@needs_triton
@pytest.mark.parametrize("lead,H,casting,offset,train_w", [
    ((3,), 3584, "llama", 0.0, True),       # Qwen2.5-VL-7B hidden size, few rows
    ((2, 3), 1152, "gemma", 1.0, True),     # Gemma 3 / SigLIP width, (B, T, H) input
    ((5,), 37, "llama", 0.0, False),        # odd width, frozen weight (LoRA): no dw
    ((2, 1, 3), 256, "gemma", 1.0, False),  # Gemma q_norm/k_norm on head_dim, 4-D input
])
def test_rms_norm_matches_reference(lead, H, casting, offset, train_w):
    g = torch.Generator().manual_seed(H)
    x = torch.randn(*lead, H, generator=g).requires_grad_()
    w = (torch.randn(H, generator=g) * 0.5).requires_grad_(train_w)
    y = rms_norm(x, w, 1e-6, offset, casting)
    assert "RMSNormFunction" in type(y.grad_fn).__name__  # the Triton path ran, not the fallback
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    gx, gw = x.grad.clone(), (w.grad.clone() if train_w else None)
    x.grad = None
    if train_w:
        w.grad = None
    y_ref = rms_norm_ref(x, w, 1e-6, offset, casting)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    if train_w:
        torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)
    else:
        assert w.grad is None


@needs_triton
def test_rms_norm_empty_and_strided_input():
    w = torch.randn(48)
    assert rms_norm(torch.randn(0, 48), w).shape == (0, 48)
    x = torch.randn(6, 96)[:, ::2]  # last-dim stride 2: copied to rows, same numbers
    torch.testing.assert_close(rms_norm(x, w), rms_norm_ref(x, w), rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_unknown_casting():
    with pytest.raises(ValueError, match="casting"):
        rms_norm(torch.randn(2, 8), torch.ones(8), casting="t5")


@needs_triton
@pytest.mark.parametrize("H,affine", [(1152, True), (1280, False), (37, True)])
def test_layer_norm_forward_matches_reference(H, affine):
    g = torch.Generator().manual_seed(H)
    x = torch.randn(3, 5, H, generator=g) * 2 + 1
    w = torch.randn(H, generator=g) if affine else None
    b = torch.randn(H, generator=g) if affine else None
    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), layer_norm_ref(x, w, b, 1e-6), rtol=1e-5, atol=1e-5)


def test_layer_norm_uses_torch_when_grad_is_needed():
    x = torch.randn(4, 32, requires_grad=True)
    w, b = torch.randn(32), torch.randn(32)
    y = layer_norm(x, w, b, 1e-5)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
