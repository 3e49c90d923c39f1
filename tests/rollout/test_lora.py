"""merged_lora (vlm_lightning.rollout.lora): the merge is exact and undone bit-exactly, and the fast engine with
the LoRA merged samples what HF ``generate`` samples with the adapter active (tiny Qwen2.5-VL, CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

from tests.rollout.prompts import hf_greedy, load_tiny, pad_id
from vlm_lightning.rollout.engine import fast_generate
from vlm_lightning.rollout.lora import merged_lora


@pytest.fixture(scope="module")
def lora_qwen(tiny_vlm_dir):
    from peft import LoraConfig, get_peft_model

    model, processor, inputs = load_tiny(tiny_vlm_dir("qwen2_5_vl"))
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
    pad = pad_id(processor)
    with torch.no_grad():
        ref_tokens, ref_logits = hf_greedy(model, inputs, 2, 6, [], pad)
    out = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[], pad_token_id=pad, backend="fast",
                        return_logits=True)
    assert out.stats["merged_layers"] > 0
    assert torch.equal(out.completion_ids, ref_tokens)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-4, rtol=1e-4)
    unmerged = fast_generate(model, inputs, 2, 6, temperature=0, eos_token_ids=[], pad_token_id=pad,
                             backend="fast", merge_lora=False, return_logits=True)
    torch.testing.assert_close(unmerged.logits, ref_logits, atol=1e-4, rtol=1e-4)


