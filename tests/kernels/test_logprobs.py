"""Fused linear token log-probs (+ entropy) for RL against the materialised reference."""
import pytest
import torch

from vlm_lightning.kernels import fused_linear_token_logprobs
from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.kernels.reference import linear_token_logprobs_ref

needs_triton = pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _run(fn, h, w, t, train_w, g_lp, g_ent, **kw):
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_(train_w)
    out = fn(h, w, t, return_entropy=g_ent is not None, **kw)
    lp, ent = out if g_ent is not None else (out, None)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if g_ent is not None else 0)
    loss.backward()
    return lp.detach(), (None if ent is None else ent.detach()), h.grad, (w.grad if train_w else None)


@needs_triton
@pytest.mark.parametrize("N,H,V,temp,softcap,entropy,train_w,chunk", [
    (29, 48, 1500, 1.0, None, False, True, 8),
    (7, 1152, 3001, 0.7, None, True, False, None),
    (10, 64, 777, 1.3, 20.0, True, True, 3),
])
def test_logprobs_match_reference(N, H, V, temp, softcap, entropy, train_w, chunk):
    g = torch.Generator().manual_seed(N * V)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5 * 3
    t = torch.randint(0, V, (N,), generator=g)
    t[2] = -100  # padding: log-prob 0, no target gradient
    g_lp = torch.randn(N, generator=g)
    g_ent = torch.randn(N, generator=g) if entropy else None
    out = _run(fused_linear_token_logprobs, h, w, t, train_w, g_lp, g_ent, temperature=temp, softcap=softcap,
               chunk_rows=chunk)
    ref = _run(linear_token_logprobs_ref, h, w, t, train_w, g_lp, g_ent, temperature=temp, softcap=softcap)
    assert out[0][2] == 0.0
    for a, b in zip(out, ref):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@needs_triton
def test_logprobs_keep_token_shape_and_no_grad():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 32, generator=g), torch.randn(90, 32, generator=g)
    t = torch.randint(0, 90, (2, 5), generator=g)
    with torch.no_grad():
        lp, ent = fused_linear_token_logprobs(h, w, t, return_entropy=True)
    assert lp.shape == ent.shape == (2, 5) and lp.dtype == torch.float32
    lr, er = linear_token_logprobs_ref(h.view(-1, 32), w, t.view(-1), return_entropy=True)
    torch.testing.assert_close(lp.view(-1), lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent.view(-1), er, rtol=1e-5, atol=1e-5)


def test_logprobs_reject_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_token_logprobs(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), 0.0)
