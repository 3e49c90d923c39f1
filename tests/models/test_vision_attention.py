"""``models.vision_attention``: Qwen-VL vision windows batched into one SDPA call per run of equal lengths give the
same vision features and gradients as transformers' per-window loop (fp32, tiny Qwen2-VL / 2.5-VL / 3-VL), and
the call count really drops."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from vlm_lightning.models.vision_attention import _runs, batch_vision_windows, windowed_sdpa


def test_runs_group_consecutive_equal_lengths_and_drop_empty_windows():
    assert list(_runs([4, 4, 0, 4, 2, 2, 4])) == [(0, 2, 4), (8, 1, 4), (12, 2, 2), (16, 1, 4)]


def test_windowed_sdpa_equals_one_call_per_window():
    torch.manual_seed(0)
    lengths = [3, 3, 3, 5, 0, 2, 2]
    q, k, v = (torch.randn(2, sum(lengths), 4) for _ in range(3))  # (heads, S, d)
    ref, start = [], 0
    for n in lengths:
        if n:
            ref.append(F.scaled_dot_product_attention(q[:, start:start + n], k[:, start:start + n],
                                                      v[:, start:start + n], scale=0.5).transpose(0, 1))
        start += n
    torch.testing.assert_close(windowed_sdpa(q, k, v, lengths, 0.5), torch.cat(ref), atol=1e-6, rtol=1e-5)


def counted_sdpa_calls(fn):
    """(fn(), how many times it called F.scaled_dot_product_attention)."""
    calls, real = {"n": 0}, F.scaled_dot_product_attention

    def counted(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    F.scaled_dot_product_attention = counted
    try:
        return fn(), calls["n"]
    finally:
        F.scaled_dot_product_attention = real


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_vision_features_and_grads_match_the_per_window_loop(tiny_vlm_dir, family):
    path = tiny_vlm_dir(family)
    torch.manual_seed(0)
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    ours = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    assert batch_vision_windows(ours) == ref.config.vision_config.depth
    vc = ref.config.vision_config
    t = getattr(vc, "temporal_patch_size", 2)
    grid = torch.tensor([[1, 8, 12], [1, 8, 12], [1, 4, 4]])  # three images, two alike, not square
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * t * vc.patch_size ** 2)
    outs = []
    for model in (ref, ours):
        feats, n_calls = counted_sdpa_calls(lambda m=model: m.model.visual(pixels, grid_thw=grid))
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (tuple, list)) else feats
        feats.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.model.visual.named_parameters() if p.grad is not None}
        outs.append((feats.detach(), grads, n_calls))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name in outs[0][1]:
        torch.testing.assert_close(outs[1][1][name], outs[0][1][name], atol=1e-5, rtol=1e-4, msg=name)
    assert outs[1][2] < outs[0][2]  # fewer attention calls


@pytest.mark.parametrize("lengths, kind", [
    ([64, 64, 64, 64, 40, 64, 64, 64, 64, 40, 0, 16], "pad"),  # edge windows of odd-sized images: one masked call
    ([3, 3, 3, 5, 0, 2, 2], "groups"),  # padding would waste too much: one call per length
    ([300, 500, 300, 64], "groups"),  # whole images (full-attention blocks): gathered by length
    ([4, 4, 4], "runs"),
])
def test_every_plan_equals_one_call_per_window_with_gradients(lengths, kind):
    from vlm_lightning.models.vision_attention import _plan

    assert _plan(lengths)[0] == kind
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, sum(lengths), 8, requires_grad=True) for _ in range(3))
    ref, start = [], 0
    for n in lengths:
        if n:
            sl = slice(start, start + n)
            ref.append(F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl], scale=0.3).transpose(0, 1))
        start += n
    ref = torch.cat(ref)
    g = torch.randn_like(ref)
    out = windowed_sdpa(q, k, v, lengths, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (q, k, v)), torch.autograd.grad((ref * g).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_plan_cache_syncs_once_per_cu_seqlens_tensor():
    from vlm_lightning.models.vision_attention import _PlanCache

    cache = _PlanCache(size=2)
    a, b = torch.tensor([0, 4, 8, 10]), torch.tensor([0, 10])
    la, pa = cache.get(a)
    assert la == [4, 4, 2] and cache.get(a)[1] is pa  # the same tensor: the cached plan
    assert cache.get(b)[0] == [10]
    a[3] = 9  # changed in place: recomputed
    assert cache.get(a)[0] == [4, 4, 1]
    assert cache.get(torch.tensor([0, 4, 8, 10]))[0] == [4, 4, 2]  # an equal but new tensor is its own entry
    assert len(cache.entries) == 2


def test_odd_sized_images_use_few_attention_calls(tiny_vlm_dir):
    """Images whose sides are not window multiples: features equal the per-window loop, in a few calls."""
    path = tiny_vlm_dir("qwen2_5_vl")
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    ours = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    batch_vision_windows(ours)
    vc = ref.config.vision_config
    grid = torch.tensor([[1, 10, 14], [1, 6, 22], [1, 18, 8]])
    torch.manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * vc.temporal_patch_size * vc.patch_size ** 2)
    feats = []
    for model in (ref, ours):
        with torch.no_grad():
            f, n_calls = counted_sdpa_calls(lambda m=model: m.model.visual(pixels, grid_thw=grid))
        f = f.pooler_output if hasattr(f, "pooler_output") else f
        feats.append((f, n_calls))
    torch.testing.assert_close(feats[1][0], feats[0][0], atol=1e-5, rtol=1e-5)
    assert feats[1][1] <= 4 * vc.depth < feats[0][1], (feats[1][1], feats[0][1])
