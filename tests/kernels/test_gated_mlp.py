"""SwiGLU / GeGLU(tanh) activation kernels (backward by recomputation) against the references."""
import pytest
import torch

from vlm_lightning.kernels import gated_act, geglu_tanh, swiglu
from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.kernels.reference import geglu_tanh_ref, swiglu_ref

needs_triton = pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)")
# the interpreter evaluates sigmoid with numpy: exp overflows to inf for very negative inputs (result exact)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


@needs_triton
@pytest.mark.parametrize("fn,ref", [(swiglu, swiglu_ref), (geglu_tanh, geglu_tanh_ref)], ids=["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(3, 5, 1153), (2, 18944), (1, 7)])  # odd, Qwen-7B intermediate, tiny
def test_gated_act_matches_reference(fn, ref, shape):
    g = torch.Generator().manual_seed(sum(shape))
    gate = (torch.randn(shape, generator=g) * 4).requires_grad_()  # wide range: saturated sigmoid/tanh too
    up = torch.randn(shape, generator=g).requires_grad_()
    y = fn(gate, up)
    assert "GatedActFunction" in type(y.grad_fn).__name__
    dy = torch.randn(shape, generator=g)
    y.backward(dy)
    dg, du = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    y_ref = ref(gate, up)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dg, gate.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(du, up.grad, rtol=1e-4, atol=1e-5)


@needs_triton
def test_gated_act_non_contiguous_inputs():
    gu = torch.randn(4, 2 * 96)
    gate, up = gu[:, :96], gu[:, 96:]  # a fused gate_up projection split in two views
    torch.testing.assert_close(swiglu(gate, up), swiglu_ref(gate, up), rtol=1e-5, atol=1e-5)


def test_gated_act_rejects_bad_input():
    with pytest.raises(ValueError, match="act must be"):
        gated_act(torch.ones(2), torch.ones(2), "relu")
    with pytest.raises(ValueError, match="must match"):
        gated_act(torch.ones(2), torch.ones(3))
