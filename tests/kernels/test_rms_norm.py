"""RMSNorm (Llama and Gemma casting) and LayerNorm-forward kernels against their torch references.

CPU: run with TRITON_INTERPRET=1 (the Triton interpreter, fp32); without it the kernels fall back to the
references and the kernel tests skip.
"""
import importlib

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


def _rms_case(n, H, casting, train_w, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(H, generator=g) * 0.5 + (0.0 if casting == "gemma" else 1.0)).to(dtype).requires_grad_(train_w)
    dy = torch.randn(n, H, generator=g).to(dtype)
    return x, w, dy


def _rms_run(fn, x, w, dy, train_w):
    x.grad = None
    if train_w:
        w.grad = None
    y = fn(x, w)
    y.backward(dy)
    return y.detach(), x.grad.clone(), (w.grad.clone() if train_w else None)


def _dw_fp64(x, w, dy, offset, casting, eps=1e-6):
    """dW in fp64 with HF's one rounding (llama: the weight multiplies x_hat rounded to x.dtype). The fp16
    torch reference also rounds every dy * x_hat product to fp16 before the row sum; the kernel keeps them
    in fp32, so in fp16 its dW is checked against this instead."""
    xd = x.detach().double()
    xhat = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "llama":
        xhat = xhat.to(x.dtype).double()
    return (dy.double() * xhat).sum(0)


def _check_rms(ours, ref, x, w, dy, offset, casting, train_w, dtype):
    (y, gx, gw), (yr, gxr, gwr) = ours, ref
    assert y.dtype == yr.dtype and gx.dtype == x.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gxr, rtol=1e-4, atol=1e-5)
    else:  # fp16 outputs: one rounding apart (the kernel keeps dy * w in fp32 where HF rounds it to fp16)
        torch.testing.assert_close(y, yr, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(gx, gxr, rtol=2e-3, atol=2e-3)
    if not train_w:
        assert gw is None and w.grad is None
        return
    assert gw.dtype == w.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(gw, gwr, rtol=1e-4, atol=1e-4)
    else:
        torch.testing.assert_close(gw.double(), _dw_fp64(x, w, dy, offset, casting), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(gw, gwr, rtol=2e-2, atol=2e-2)  # the fp16 reference, loosely


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("train_w", [True, False])
@pytest.mark.parametrize("n,H", [
    (67, 96),    # rows not a multiple of the 64-row interpreter tile: the last tile is partial
    (300, 40),   # trainable weight: 4 persistent programs of 75 rows = two 64-row tiles each, the last masked
])
def test_rms_norm_tiles_dtypes_frozen_and_trainable(dtype, casting, offset, train_w, n, H):
    x, w, dy = _rms_case(n, H, casting, train_w, dtype, seed=n + H)
    ours = _rms_run(lambda a, b: rms_norm(a, b, 1e-6, offset, casting), x, w, dy, train_w)
    assert "RMSNormFunction" in type(rms_norm(x, w, 1e-6, offset, casting).grad_fn).__name__
    ref = _rms_run(lambda a, b: rms_norm_ref(a, b, 1e-6, offset, casting), x, w, dy, train_w)
    assert ours[0].dtype == dtype
    _check_rms(ours, ref, x, w, dy, offset, casting, train_w, dtype)


@needs_triton
@pytest.mark.parametrize("H", [3584, 1000])
@pytest.mark.parametrize("casting,offset", [("llama", 0.0), ("gemma", 1.0)])
@pytest.mark.parametrize("train_w", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_gpu_tiling_under_the_interpreter(monkeypatch, H, casting, offset, train_w, dtype):
    """The GPU launch shapes run by the interpreter on 37 rows: H=3584 is one 4096-wide row per program;
    H=1000 two 1024-wide rows per program (the last tile half empty). With a trainable weight the
    persistent dW programs (4 or 6 here) loop over their rows tile by tile, prefetching the next one."""
    rn = importlib.import_module("vlm_lightning.kernels.rms_norm")  # the package attribute is the function
    cfg = rn._config
    monkeypatch.setattr(rn, "_config", lambda h, cuda: cfg(h, True))
    assert rn._config(H, False)[:2] == ((4096, 1) if H == 3584 else (1024, 2))
    x, w, dy = _rms_case(37, H, casting, train_w, dtype, seed=H)
    ours = _rms_run(lambda a, b: rms_norm(a, b, 1e-6, offset, casting), x, w, dy, train_w)
    ref = _rms_run(lambda a, b: rms_norm_ref(a, b, 1e-6, offset, casting), x, w, dy, train_w)
    _check_rms(ours, ref, x, w, dy, offset, casting, train_w, dtype)


@needs_triton
def test_rms_norm_mixed_dtypes_and_row_strided_input():
    """fp16 x with an fp32 weight (llama casting promotes the output to fp32, as HF does); x a row-strided
    view (rows of a wider buffer) read in place; dy arriving non-contiguous."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(9, 80, generator=g).half()
    x = base[:, :64].requires_grad_()  # row stride 80
    w = (torch.randn(64, generator=g) * 0.3 + 1).requires_grad_()
    y = rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32 and y.is_contiguous()
    dy = torch.randn(64, 9, generator=g).t()  # non-contiguous upstream gradient
    y.backward(dy)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    yr = rms_norm_ref(x, w, 1e-6)
    yr.backward(dy)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-4)
