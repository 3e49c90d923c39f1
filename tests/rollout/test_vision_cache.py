"""cached_image_features (vlm_lightning.rollout.vision_cache) on tiny frozen VLMs (CPU, fp32): the tower runs once
per prompt batch, every tiled forward after it gets the same log-probs as the uncached forward, other pixel
values pass through, a trainable tower is never cached; the fast engine's sampling log-probs equal the trainer's."""
from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tests.rollout.prompts import load_tiny, pad_id
from vlm_lightning.models.hf import unwrap_model
from vlm_lightning.rollout import completion_logprobs, fast_generate, tile_batch
from vlm_lightning.rollout.vision_cache import cached_image_features, tile_features, vision_is_frozen


def _completions(inputs, g, c=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = inputs["input_ids"].shape[0] * g
    ids = torch.randint(10, 60, (n, c), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 2:] = 0  # one short completion
    return ids, mask


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next", "gemma3", "qwen3_vl"])  # qwen3_vl: deepstack
def test_features_computed_once_and_logprobs_unchanged(tiny_vlm_dir, family):
    model, processor, inputs = load_tiny(tiny_vlm_dir(family))
    model.requires_grad_(False)
    ids, mask = _completions(inputs, 3)
    pad = pad_id(processor)
    with torch.no_grad():
        ref3 = completion_logprobs(model, tile_batch(inputs, 3), ids, mask)  # the tower on 3 tiles
        ref1 = completion_logprobs(model, inputs, ids[:2], mask[:2])
    ref_hf = fast_generate(model, inputs, 3, 3, temperature=0, pad_token_id=pad, backend="hf").completion_ids
    inner = unwrap_model(model).model
    with cached_image_features(model, inputs) as cache:
        assert cache is not None
        with torch.no_grad():
            fast_generate(model, inputs, 3, 2, temperature=0, pad_token_id=pad, backend="fast")
            got_hf = fast_generate(model, inputs, 3, 3, temperature=0, pad_token_id=pad, backend="hf").completion_ids
            got3 = completion_logprobs(model, tile_batch(inputs, 3), ids, mask)
            got1 = completion_logprobs(model, inputs, ids[:2], mask[:2])
    assert "get_image_features" not in vars(inner)  # the method is back
    # the fast prefill (1 copy) computes; HF generate's 3 tiles, the 3-tile and 1-tile forwards reuse
    assert cache.stats == {"computed": 1, "reused": 3, "passed_through": 0}, cache.stats
    assert torch.equal(got_hf, ref_hf)
    torch.testing.assert_close(got3, ref3, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got1, ref1, atol=1e-6, rtol=1e-6)


def test_other_pixel_values_pass_through_and_trainable_towers_are_not_cached(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_vl"))
    model.requires_grad_(False)
    other = dict(inputs, pixel_values=inputs["pixel_values"] + 1.0)
    ids, mask = _completions(inputs, 1)
    with torch.no_grad():
        ref = completion_logprobs(model, other, ids, mask)
        with cached_image_features(model, inputs) as cache:
            got = completion_logprobs(model, other, ids, mask)
    assert cache.stats["passed_through"] == 1 and cache.stats["computed"] == 0
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert vision_is_frozen(model)
    next(unwrap_model(model).model.visual.merger.parameters()).requires_grad_(True)  # a trainable projector
    assert not vision_is_frozen(model)
    with cached_image_features(model, inputs) as cache:
        assert cache is None and "get_image_features" not in vars(unwrap_model(model).model)
    with cached_image_features(model, inputs, enabled=False) as cache:
        assert cache is None


def test_tile_features_repeats_each_layout():
    flat = torch.arange(6.0).view(3, 2)  # Qwen: (n_tokens, H) of all images
    per_image = (torch.zeros(2, 2), torch.ones(1, 2))  # LLaVA / Qwen pooler_output: one tensor per image
    out = BaseModelOutputWithPooling(last_hidden_state=flat, pooler_output=per_image, hidden_states=(flat,))
    tiled = tile_features(out, 2)
    assert torch.equal(tiled.last_hidden_state, torch.cat([flat, flat]))
    assert len(tiled.pooler_output) == 4 and torch.equal(tiled.pooler_output[2], per_image[0])
    assert tiled.hidden_states is None  # per-layer tower states: not tiled, not read by any forward
    assert torch.equal(tile_features(flat, 3), torch.cat([flat] * 3))


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_fast_engine_returns_the_trainers_sampling_logprobs(tiny_vlm_dir, backend):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_vl"))
    torch.manual_seed(0)
    out = fast_generate(model, inputs, 2, 5, temperature=0.7, pad_token_id=pad_id(processor), backend=backend)
    if backend == "hf":
        assert out.sampling_logprobs is None  # only the fast engine reports its own numbers
        return
    assert out.sampling_logprobs.shape == out.completion_ids.shape
    with torch.no_grad():
        trainer = completion_logprobs(model, tile_batch(inputs, 2), out.completion_ids, out.completion_mask,
                                      temperature=0.7)
    m = out.completion_mask.bool()
    torch.testing.assert_close(out.sampling_logprobs[m], trainer[m], atol=1e-4, rtol=1e-4)
    assert (out.sampling_logprobs[~m] == 0).all()
    greedy = fast_generate(model, inputs, 1, 2, temperature=0, pad_token_id=pad_id(processor), backend="fast")
    assert greedy.sampling_logprobs is None
