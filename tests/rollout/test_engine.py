"""fast_generate (vlm_lightning.rollout.engine) against HF ``generate`` on tiny random VLMs (CPU, fp32).

Greedy tokens equal ``generate``'s for every row; the raw logits of every step agree to 1e-4; prefix
sharing changes nothing; EOS / truncation / stop-string masks are exact; the HF fallback gives the same result.
"""
from __future__ import annotations

import pytest
import torch

from tests.rollout.prompts import hf_greedy, load_tiny, pad_id
from vlm_lightning.rollout.engine import fast_generate
from vlm_lightning.rollout.masks import completion_masks

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "llava_next", "mistral3_small", "qwen3_vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tiny_vlm_dir):
    return (request.param, *load_tiny(tiny_vlm_dir(request.param)))


def test_greedy_tokens_and_logits_equal_hf_generate(family_setup):
    family, model, processor, inputs = family_setup
    pad = pad_id(processor)
    ref_tokens, ref_logits = hf_greedy(model, inputs, 2, 8, [], pad)
    out = fast_generate(model, inputs, 2, 8, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert out.backend == "fast"
    assert torch.equal(out.completion_ids, ref_tokens), family
    assert out.logits.shape == ref_logits.shape
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert out.completion_mask.all() and out.truncated.all()
    assert torch.equal(out.prompt_ids, torch.cat([inputs["input_ids"]] * 2))


def test_eos_and_truncation_masks_match_hf(family_setup):
    """EOS = the token row 0 emits greedily at step k (2, or the latest step whose token is new in the row; a
    random tiny model may repeat one token): row 0 ends there (EOS kept, pad after), like generate."""
    family, model, processor, inputs = family_setup
    pad = pad_id(processor)
    first = fast_generate(model, inputs, 1, 6, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast")
    row = first.completion_ids[0].tolist()
    k = next(i for i in (2, 1, 0) if row[i] not in row[:i])  # k = 0 always qualifies
    eos_id = row[k]
    ref_tokens, _ = hf_greedy(model, inputs, 2, 6, [eos_id], pad)
    out = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[eos_id], pad_token_id=pad,
                        backend="fast")
    ref_ids, ref_mask, ref_trunc = completion_masks(ref_tokens, [eos_id], pad)
    assert torch.equal(out.completion_ids, ref_ids)
    assert torch.equal(out.completion_mask, ref_mask)
    assert torch.equal(out.truncated, ref_trunc)
    # row 0 and its copy (row B) stop after k + 1 tokens, EOS included
    b = inputs["input_ids"].shape[0]
    for r in (0, b):
        assert out.completion_mask[r, :k + 1].all() and not out.completion_mask[r, k + 1:].any()
        assert int(out.completion_ids[r, k]) == eos_id and not bool(out.truncated[r])
        assert (out.completion_ids[r, k + 1:] == pad).all()


def test_prefix_sharing_gives_the_same_samples(family_setup):
    family, model, processor, inputs = family_setup
    pad = pad_id(processor)
    runs = []
    for share in (True, False):
        gen = torch.Generator().manual_seed(123)
        runs.append(fast_generate(model, inputs, 3, 6, temperature=1.0, top_p=0.9, eos_token_ids=[],
                                  pad_token_id=pad, generator=gen, share_prefix=share, return_logits=True))
    shared, tiled = runs
    assert torch.equal(shared.completion_ids, tiled.completion_ids), family
    torch.testing.assert_close(shared.logits, tiled.logits, atol=1e-5, rtol=1e-5)


def test_sliding_window_decode_matches_hf(tmp_path):
    """Gemma 3 with a window shorter than the prompt: sliding layers see only the last tokens."""
    from vlm_lightning.models.tiny import make_tiny_vlm

    path = make_tiny_vlm("gemma3", tmp_path / "gemma3_w6", text_config={"sliding_window": 6})
    model, processor, inputs = load_tiny(path)
    pad = pad_id(processor)
    ref_tokens, ref_logits = hf_greedy(model, inputs, 2, 8, [], pad)
    out = fast_generate(model, inputs, 2, 8, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert torch.equal(out.completion_ids, ref_tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_sampling_respects_top_k_and_suppressed_ids(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_vl"))
    gen = torch.Generator().manual_seed(0)
    out = fast_generate(model, inputs, 4, 5, temperature=1.0, top_k=2, eos_token_ids=[], pad_token_id=0,
                        generator=gen, return_logits=True, suppress_token_ids=[198])
    assert not (out.completion_ids == 198).any()  # greedy picks 198 everywhere on this model
    top2 = out.logits.index_fill(2, torch.tensor([198]), -float("inf")).topk(2, dim=-1).indices  # (N, C, 2)
    assert (top2 == out.completion_ids[..., None]).any(-1).all()


def test_stop_strings_end_rows_in_the_loop(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_5_vl"))
    tok = processor.tokenizer
    first = fast_generate(model, inputs, 1, 6, temperature=0, eos_token_ids=[], pad_token_id=0)
    stop = tok.decode(first.completion_ids[0, 1:3])
    out = fast_generate(model, inputs, 2, 40, temperature=0, eos_token_ids=[], pad_token_id=0, stop_strings=[stop],
                        tokenizer=tok, check_every=4)
    assert not bool(out.truncated[0])
    end = int(out.completion_mask[0].sum())
    assert end <= 3 and stop in tok.decode(out.completion_ids[0, :end])
    assert out.stats["steps"] < 40 or bool(out.truncated.any())


def test_fallback_to_hf_generate_gives_the_same_result(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_vl"))
    fast = fast_generate(model, inputs, 2, 5, temperature=0, eos_token_ids=[], pad_token_id=0)
    hf = fast_generate(model, inputs, 2, 5, temperature=0, eos_token_ids=[], pad_token_id=0, backend="hf")
    assert (fast.backend, hf.backend) == ("fast", "hf_generate")
    assert torch.equal(fast.completion_ids, hf.completion_ids) and torch.equal(fast.completion_mask, hf.completion_mask)
    other = fast_generate(model, inputs, 2, 3, temperature=1.0, eos_token_ids=[], pad_token_id=0, min_p=0.1)
    assert other.backend == "hf_generate" and other.completion_ids.shape[0] == 4
    with pytest.raises(ValueError, match="left padded"):
        bad = dict(inputs, attention_mask=inputs["attention_mask"].flip(1))
        fast_generate(model, bad, 2, 3, eos_token_ids=[], pad_token_id=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_5_vl"))
    model = model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    eager = fast_generate(model, inputs, 4, 12, temperature=0, eos_token_ids=[], pad_token_id=0,
                          use_cuda_graphs=False, return_logits=True)
    graphed = fast_generate(model, inputs, 4, 12, temperature=0, eos_token_ids=[], pad_token_id=0,
                            use_cuda_graphs=True, return_logits=True)
    assert graphed.backend == "fast+cuda_graph"
    assert torch.equal(eager.completion_ids, graphed.completion_ids)
    torch.testing.assert_close(eager.logits, graphed.logits, atol=1e-4, rtol=1e-4)


def test_fused_decode_step_equals_the_hf_modules_one_by_one(family_setup):
    """fuse_decode (one q/k/v GEMM, fused RoPE / RMSNorm / gated MLP) gives the logits of the unfused step."""
    name, model, processor, inputs = family_setup
    kw = dict(temperature=0, eos_token_ids=[], pad_token_id=pad_id(processor), return_logits=True)
    fused = fast_generate(model, inputs, 2, 6, fuse_decode=True, **kw)
    plain = fast_generate(model, inputs, 2, 6, fuse_decode=False, **kw)
    assert torch.equal(fused.completion_ids, plain.completion_ids), name
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_fused_qkv_reads_merged_lora_weights_and_refuses_active_adapters(tiny_vlm_dir):
    """The fused q/k/v weight is taken only from layers whose forward is a plain linear right now."""
    from peft import LoraConfig, get_peft_model

    from vlm_lightning.rollout.decode import _fused_qkv, linear_params
    from vlm_lightning.rollout.lora import merged_lora

    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_5_vl"))
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    attn = peft.base_model.model.model.language_model.layers[0].self_attn
    assert linear_params(attn.q_proj) is None  # adapter active: q_proj(x) is not its base linear
    assert _fused_qkv(attn) is None
    x = torch.randn(3, attn.q_proj.in_features)
    with merged_lora(peft):
        w, b, splits = _fused_qkv(attn)
        want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
    torch.testing.assert_close(torch.nn.functional.linear(x, w, b), want, atol=1e-5, rtol=1e-5)
    assert splits == [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
    kw = dict(temperature=0, eos_token_ids=[], pad_token_id=pad_id(processor), return_logits=True)
    fused = fast_generate(peft, inputs, 2, 5, fuse_decode=True, **kw)
    plain = fast_generate(peft, inputs, 2, 5, fuse_decode=False, **kw)
    torch.testing.assert_close(fused.logits, plain.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_decode_matches_unfused_in_bf16_on_cuda(tiny_vlm_dir):
    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_5_vl"))
    model = model.cuda().to(torch.bfloat16)
    inputs = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in inputs.items()}
    kw = dict(temperature=0, eos_token_ids=[], pad_token_id=0, return_logits=True)
    fused = fast_generate(model, inputs, 4, 12, fuse_decode=True, **kw)
    plain = fast_generate(model, inputs, 4, 12, fuse_decode=False, **kw)
    assert fused.backend == "fast+cuda_graph"
    first = (fused.logits[:, 0] - plain.logits[:, 0]).abs().max()
    assert first <= 0.05 * plain.logits[:, 0].abs().max(), first
