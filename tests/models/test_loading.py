"""load_vlm: 16-bit and 4-bit loading per family; only the language model's linears become Linear4bit.

bitsandbytes 0.50 quantises NF4 on the CPU, so the 4-bit tests run here (and again on the GPU in
tests/gpu/sft_gpu_check.py). The pure-logic test checks, with transformers' own matcher, which module
names the skip list leaves to quantise.
"""
from __future__ import annotations

import pytest
import torch

from vlm_lightning.models import build_quantization_config, get_family_spec, load_vlm, quantization_skip_modules
from vlm_lightning.models.tiny import TINY_FAMILIES, resolve_model_path


def _tiny(tiny_vlm_dir, family):
    try:
        return tiny_vlm_dir(family)
    except NotImplementedError as err:  # fixture for this family not built yet
        pytest.skip(str(err))


def _linear_names(model, prefix=None):
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and (prefix is None or n.startswith(prefix + "."))}


def _meta_model(path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_skip_list_leaves_exactly_the_language_linears(family, tiny_vlm_dir):
    """Pure logic, with transformers' matcher: vision tower, projector and lm_head are never quantised."""
    sc = pytest.importorskip("transformers.quantizers.quantizers_utils")
    path = _tiny(tiny_vlm_dir, family)
    model = _meta_model(path)
    spec = get_family_spec(model)
    skip = quantization_skip_modules(spec)
    assert "lm_head" in skip and spec.vision_tower in skip and spec.projector in skip
    quantised = {n for n in _linear_names(model) if sc.should_convert_module(n, skip)}
    assert quantised == _linear_names(model, spec.language_model)
    cfg = build_quantization_config("4bit", spec, quant_storage="bfloat16")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16 and cfg.bnb_4bit_quant_storage == torch.bfloat16
    assert set(cfg.llm_int8_skip_modules) == set(skip)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_4bit_quantises_only_the_language_model(family, tiny_vlm_dir):
    bnb = pytest.importorskip("bitsandbytes")
    path = _tiny(tiny_vlm_dir, family)
    model, processor = load_vlm(path, quantization="4bit", dtype="bfloat16")
    spec = get_family_spec(model)
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert four_bit == _linear_names(model, spec.language_model)
    for prefix in (spec.vision_tower, spec.projector):
        for n in _linear_names(model, prefix):
            m = model.get_submodule(n)
            assert not isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.bfloat16, n
    head = model.get_submodule(spec.lm_head)
    assert not isinstance(head, bnb.nn.Linear4bit) and head.weight.dtype == torch.bfloat16
    assert processor is not None


def test_mllama_4bit_keeps_vision_projector_and_gates_16bit(tiny_vlm_dir):
    """QLoRA on Llama 3.2 Vision: the cross-attention q/k/v/o are 4-bit like the rest of the language model; the
    vision model, the projector and the cross-attention gates (plain parameters, never bnb's business) stay bf16."""
    bnb = pytest.importorskip("bitsandbytes")
    model, _ = load_vlm(_tiny(tiny_vlm_dir, "mllama"), quantization="4bit", dtype="bfloat16")
    skipped = ["model.vision_model", "model.multi_modal_projector"]
    assert quantization_skip_modules(get_family_spec(model))[:2] == skipped
    assert model.config.quantization_config.llm_int8_skip_modules[:2] == skipped
    layers = model.model.language_model.layers
    for i in model.config.text_config.cross_attention_layers:
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layers[i].cross_attn, m), bnb.nn.Linear4bit)
        for gate in (layers[i].cross_attn_attn_gate, layers[i].cross_attn_mlp_gate):
            assert gate.dtype == torch.bfloat16 and gate.numel() == 1 and float(gate) != 0.0
    vision = {p.dtype for p in model.model.vision_model.parameters()} | {
        p.dtype for p in model.model.multi_modal_projector.parameters()}
    assert vision == {torch.bfloat16}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.vision_model.modules())


def test_load_16bit_and_dtype(tiny_vlm_dir):
    path = _tiny(tiny_vlm_dir, "qwen2_vl")
    model, processor = load_vlm(path, dtype="float32")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model, _ = load_vlm(path, dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="dtype='int3'"):
        load_vlm(path, dtype="int3")
    with pytest.raises(ValueError, match="quantization='3bit'"):
        build_quantization_config("3bit", get_family_spec(model))


def test_tiny_scheme_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_LIGHTNING_TINY_DIR", str(tmp_path))
    first = resolve_model_path("tiny:qwen2_vl")
    assert first == str(tmp_path / "qwen2_vl") and (tmp_path / "qwen2_vl" / "config.json").exists()
    stamp = (tmp_path / "qwen2_vl" / "config.json").stat().st_mtime_ns
    assert resolve_model_path("tiny:qwen2_vl") == first  # reused, not rebuilt
    assert (tmp_path / "qwen2_vl" / "config.json").stat().st_mtime_ns == stamp
    assert resolve_model_path(f"tiny:qwen2_vl@{tmp_path / 'here'}") == str(tmp_path / "here")
    assert resolve_model_path("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="unknown tiny model 'nope'"):
        resolve_model_path("tiny:nope")


def test_demo_preset_splits_digits_like_the_real_tokenizers(tmp_path):
    from transformers import AutoProcessor

    path = resolve_model_path(f"tiny:ocr_demo@{tmp_path / 'demo'}")
    tokenizer = AutoProcessor.from_pretrained(path).tokenizer
    assert tokenizer.tokenize("0171") == ["0", "1", "7", "1"]
    model, _ = load_vlm(path, dtype="float32")
    assert model.config.text_config.hidden_size == 128
