"""fast_generate (vlm_lightning.rollout) against HF ``generate`` on tiny random VLMs (CPU, fp32).

Greedy tokens equal ``generate``'s for every row; the raw logits of every step agree to 1e-4; prefix
sharing changes nothing; the LoRA merge is exact and is undone bit-exactly; EOS / truncation / stop-string
masks are exact; the sampling warpers are HF's.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_lightning.data.collate import VisionChatCollator
from vlm_lightning.rollout import completion_masks, fast_generate, merged_lora, warp_logits

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "llava_next", "mistral3_small"]


def _rows(n=2):
    """n prompts of different lengths (so the batch is left padded), one small image each."""
    rows = []
    for i in range(n):
        img = Image.new("RGB", (56 + 28 * (i % 2), 56), (255 - 40 * i, 200, 255))
        text = "Read it." + " Carefully please." * (2 * i)
        rows.append({"index": i, "messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]})
    return rows


def _load(path):
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path)
    batch = VisionChatCollator(processor, for_generation=True)(_rows())
    inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    assert (inputs["attention_mask"] == 0).any(), "the test batch should be left padded"
    return model, processor, inputs


@pytest.fixture(scope="module", params=FAMILIES)
def family_setup(request, tiny_vlm_dir):
    return (request.param, *_load(tiny_vlm_dir(request.param)))


def _hf_greedy(model, inputs, g, max_new_tokens, eos, pad):
    """HF generate on the tiled batch (tile order), raw logits of every step."""
    tiled = {k: torch.cat([v] * g, 0) for k, v in inputs.items()}
    out = model.generate(**tiled, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos or None,
                         pad_token_id=pad, return_dict_in_generate=True, output_logits=True)
    tokens = out.sequences[:, tiled["input_ids"].shape[1]:]
    return tokens, torch.stack([x.float() for x in out.logits], 1)


def _pad(processor):
    tok = getattr(processor, "tokenizer", processor)
    return tok.pad_token_id if tok.pad_token_id is not None else 0


def test_greedy_tokens_and_logits_equal_hf_generate(family_setup):
    family, model, processor, inputs = family_setup
    pad = _pad(processor)
    ref_tokens, ref_logits = _hf_greedy(model, inputs, 2, 8, [], pad)
    out = fast_generate(model, inputs, 2, 8, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert out.backend == "fast"
    assert torch.equal(out.completion_ids, ref_tokens), family
    assert out.logits.shape == ref_logits.shape
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert out.completion_mask.all() and out.truncated.all()
    assert torch.equal(out.prompt_ids, torch.cat([inputs["input_ids"]] * 2))


def test_eos_and_truncation_masks_match_hf(family_setup):
    """EOS = the token row 0 emits greedily at step 2: row 0 ends there (EOS kept, pad after), like generate."""
    family, model, processor, inputs = family_setup
    pad = _pad(processor)
    first = fast_generate(model, inputs, 1, 6, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast")
    eos_id = int(first.completion_ids[0, 2])
    if eos_id in first.completion_ids[0, :2].tolist():
        pytest.skip(f"{family}: greedy row repeats the token early; the EOS position would be ambiguous")
    ref_tokens, _ = _hf_greedy(model, inputs, 2, 6, [eos_id], pad)
    out = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[eos_id], pad_token_id=pad,
                        backend="fast")
    ref_ids, ref_mask, ref_trunc = completion_masks(ref_tokens, [eos_id], pad)
    assert torch.equal(out.completion_ids, ref_ids)
    assert torch.equal(out.completion_mask, ref_mask)
    assert torch.equal(out.truncated, ref_trunc)
    # row 0 and its copy (row B) stop after 3 tokens, EOS included
    b = inputs["input_ids"].shape[0]
    for r in (0, b):
        assert out.completion_mask[r, :3].tolist() == [1, 1, 1] and not out.completion_mask[r, 3:].any()
        assert int(out.completion_ids[r, 2]) == eos_id and not bool(out.truncated[r])
        assert (out.completion_ids[r, 3:] == pad).all()


def test_prefix_sharing_gives_the_same_samples(family_setup):
    family, model, processor, inputs = family_setup
    pad = _pad(processor)
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
    from vlm_lightning.testing import make_tiny_vlm

    path = make_tiny_vlm("gemma3", tmp_path / "gemma3_w6", text_config={"sliding_window": 6})
    model, processor, inputs = _load(path)
    pad = _pad(processor)
    ref_tokens, ref_logits = _hf_greedy(model, inputs, 2, 8, [], pad)
    out = fast_generate(model, inputs, 2, 8, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert torch.equal(out.completion_ids, ref_tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def lora_qwen(tiny_vlm_dir):
    from peft import LoraConfig, get_peft_model

    model, processor, inputs = _load(tiny_vlm_dir("qwen2_5_vl"))
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,  # B != 0: the adapter changes the logits
                     target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$")
    peft_model = get_peft_model(model, cfg)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # large enough to change the logits clearly
            param.data.normal_(0, 0.3)
    return peft_model, processor, inputs


def test_lora_merge_is_exact_and_restored_bit_exactly(lora_qwen):
    model, processor, inputs = lora_qwen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = model(**inputs).logits
        with merged_lora(model) as n_merged:
            assert n_merged == 7 * model.config.text_config.num_hidden_layers
            merged = model(**inputs).logits
            changed = [n for n, p in model.named_parameters() if "base_layer" in n and not torch.equal(p, before[n])]
            assert changed, "merging should change the base weights"
        with model.disable_adapter():
            base = model(**inputs).logits
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)
    assert (base - ref).abs().max() > 1e-3, "the adapter should matter (init_lora_weights=False)"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored bit-exactly"
        assert p.requires_grad == grads[n], n
    assert all(not m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))


def test_lora_policy_fast_path_matches_generate_with_adapter_active(lora_qwen):
    model, processor, inputs = lora_qwen
    pad = _pad(processor)
    with torch.no_grad():
        ref_tokens, ref_logits = _hf_greedy(model, inputs, 2, 6, [], pad)
    out = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert out.stats["merged_layers"] > 0
    assert torch.equal(out.completion_ids, ref_tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    unmerged = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[], pad_token_id=pad,
                             backend="fast", merge_lora=False, return_logits=True)
    torch.testing.assert_close(unmerged.logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_warpers_equal_hf_processors():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 97) * 3
    ids = torch.zeros(5, 1, dtype=torch.long)
    for temp, k, p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (0.5, 3, 1.0)]:
        procs = LogitsProcessorList([SuppressTokensLogitsProcessor([4, 7]), TemperatureLogitsWarper(temp)])
        if k:
            procs.append(TopKLogitsWarper(k))
        if p < 1:
            procs.append(TopPLogitsWarper(p))
        ref = procs(ids, logits.clone())
        ours = warp_logits(logits, temp, k, p, torch.tensor([4, 7]))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (temp, k, p)
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))


def test_sampling_respects_top_k_and_suppressed_ids(tiny_vlm_dir):
    model, processor, inputs = _load(tiny_vlm_dir("qwen2_vl"))
    gen = torch.Generator().manual_seed(0)
    out = fast_generate(model, inputs, 4, 5, temperature=1.0, top_k=2, eos_token_ids=[], pad_token_id=0,
                        generator=gen, return_logits=True, suppress_token_ids=[198])
    assert not (out.completion_ids == 198).any()  # greedy picks 198 everywhere on this model
    top2 = out.logits.index_fill(2, torch.tensor([198]), -float("inf")).topk(2, dim=-1).indices  # (N, C, 2)
    assert (top2 == out.completion_ids[..., None]).any(-1).all()


def test_completion_masks_eos_stop_strings_and_truncation(tiny_vlm_dir):
    tok = AutoProcessor.from_pretrained(tiny_vlm_dir("qwen2_vl")).tokenizer
    a = tok("hello world", add_special_tokens=False).input_ids
    b = tok("the answer</a> tail", add_special_tokens=False).input_ids
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    width = max(len(a), len(b)) + 3
    rows = [a + [eos] + [5] * (width - len(a) - 1), b + [7] * (width - len(b)), [9] * width]
    tokens = torch.tensor(rows)
    ids, mask, trunc = completion_masks(tokens, [eos], pad_token_id=0, stop_strings=["</a>"], tokenizer=tok)
    assert mask[0].sum() == len(a) + 1 and int(ids[0, len(a)]) == eos and (ids[0, len(a) + 1:] == 0).all()
    end_b = int(mask[1].sum())
    assert "</a>" in tok.decode(ids[1, :end_b]) and "</a>" not in tok.decode(ids[1, : end_b - 1])
    assert trunc.tolist() == [False, False, True] and mask[2].all() and ids.shape[1] == width


def test_stop_strings_end_rows_in_the_loop(tiny_vlm_dir):
    model, processor, inputs = _load(tiny_vlm_dir("qwen2_5_vl"))
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
    model, processor, inputs = _load(tiny_vlm_dir("qwen2_vl"))
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
    model, processor, inputs = _load(tiny_vlm_dir("qwen2_5_vl"))
    model = model.cuda()
    inputs = {k: v.cuda() for k, v in inputs.items()}
    eager = fast_generate(model, inputs, 4, 12, temperature=0, eos_token_ids=[], pad_token_id=0,
                          use_cuda_graphs=False, return_logits=True)
    graphed = fast_generate(model, inputs, 4, 12, temperature=0, eos_token_ids=[], pad_token_id=0,
                            use_cuda_graphs=True, return_logits=True)
    assert graphed.backend == "fast+cuda_graph"
    assert torch.equal(eager.completion_ids, graphed.completion_ids)
    torch.testing.assert_close(eager.logits, graphed.logits, atol=1e-4, rtol=1e-4)
