"""Fused linear cross-entropy against the materialised reference: loss, grad wrt hidden and lm_head."""
import pytest
import torch

from vlm_lightning.kernels import fused_linear_cross_entropy
from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.kernels.reference import linear_cross_entropy_ref

needs_triton = pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _data(N, H, V, seed, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    y = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    return h, w, y


def _grads(fn, h, w, y, train_w, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_(train_w)
    loss = fn(h, w, y, **kw)
    loss.backward()
    return loss.detach(), h.grad, (w.grad if train_w else None)


@needs_triton
@pytest.mark.parametrize("N,H,V,chunk,softcap,train_w,nib", [
    (37, 48, 1500, 8, None, True, None),     # ragged rows over chunks, trainable head
    (13, 1152, 3001, None, None, False, None),  # Gemma width, odd vocab, frozen head
    (9, 3584, 517, 4, 30.0, False, 40),      # Qwen-7B width, Gemma softcap, global denominator
    (20, 64, 2048, 5, 5.0, True, None),      # strong softcap, trainable head
])
def test_flce_matches_reference(N, H, V, chunk, softcap, train_w, nib):
    h, w, y = _data(N, H, V, seed=N + V)
    y[4:7] = -100
    out = _grads(fused_linear_cross_entropy, h, w, y, train_w, softcap=softcap, chunk_rows=chunk,
                 num_items_in_batch=nib)
    ref = _grads(linear_cross_entropy_ref, h, w, y, train_w, softcap=softcap, num_items_in_batch=nib)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref[1], rtol=1e-4, atol=1e-6)
    if train_w:
        torch.testing.assert_close(out[2], ref[2], rtol=1e-4, atol=1e-6)
    else:
        assert out[2] is None


@needs_triton
def test_flce_sum_reduction_and_no_ignored_rows():
    h, w, y = _data(11, 40, 300, seed=1, ignore_every=0)
    out = _grads(fused_linear_cross_entropy, h, w, y, True, reduction="sum", chunk_rows=4)
    ref = _grads(linear_cross_entropy_ref, h, w, y, True, reduction="sum")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
def test_flce_all_ignored_gives_zero_loss_and_grads():
    h, w, y = _data(6, 32, 100, seed=2)
    y[:] = -100
    loss, gh, gw = _grads(fused_linear_cross_entropy, h, w, y, True)
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


@needs_triton
def test_flce_gradient_accumulation_with_global_denominator():
    """Two micro-batches scaled by the step's token count sum to the one-batch gradient."""
    h, w, y = _data(24, 32, 200, seed=3)
    y[12:20] = -100  # the second half has fewer valid tokens
    n_items = int((y != -100).sum())
    full = _grads(fused_linear_cross_entropy, h, w, y, True)
    parts = [_grads(fused_linear_cross_entropy, h[s], w, y[s], True, num_items_in_batch=torch.tensor(n_items))
             for s in (slice(0, 12), slice(12, 24))]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full[1], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(parts[0][2] + parts[1][2], full[2], rtol=1e-4, atol=1e-7)


@needs_triton
def test_flce_no_grad_and_upstream_scale():
    h, w, y = _data(10, 32, 150, seed=4)
    with torch.no_grad():
        l0 = fused_linear_cross_entropy(h, w, y)
    torch.testing.assert_close(l0, linear_cross_entropy_ref(h, w, y), rtol=1e-5, atol=1e-6)
    hh = h.clone().requires_grad_()
    (fused_linear_cross_entropy(hh, w, y) * 0.25).backward()  # e.g. 1/accumulate_grad_batches
    hr = h.clone().requires_grad_()
    (linear_cross_entropy_ref(hr, w, y) * 0.25).backward()
    torch.testing.assert_close(hh.grad, hr.grad, rtol=1e-4, atol=1e-7)


def test_flce_bad_labels_and_shapes_raise():
    h, w, y = _data(4, 8, 10, seed=5, ignore_every=0)
    y[1] = 10
    with pytest.raises(ValueError, match="label 10 is outside the vocabulary"):
        fused_linear_cross_entropy(h, w, y)
    with pytest.raises(ValueError, match="hidden rows"):
        fused_linear_cross_entropy(h, w, y[:3])
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="none")


def test_flce_torch_fallback_matches_reference(monkeypatch):
    """The CPU path without Triton (chunked torch ops) gives the same numbers."""
    import vlm_lightning.kernels._vocab as vocab

    monkeypatch.setattr(vocab, "triton_ok", lambda *t: False)
    h, w, y = _data(15, 24, 130, seed=6)
    out = _grads(fused_linear_cross_entropy, h, w, y, True, softcap=4.0, chunk_rows=4)
    ref = _grads(linear_cross_entropy_ref, h, w, y, True, softcap=4.0)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
