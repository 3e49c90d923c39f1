"""LoRA merge: the merged folder reloads with plain transformers (no missing/unexpected keys) and gives
the logits of the in-memory PEFT model (fp32 CPU, atol 1e-4) on an image + text prompt, for every family.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from vlm_lightning.export import merge_lora
from vlm_lightning.models.tiny import TINY_FAMILIES


def _lora(model, seed=0):
    """A non-trivial adapter (init_lora_weights=False) on the language and vision layers, plus a trained
    (perturbed) full copy of the projector (`modules_to_save`), as `apply_lora` builds it for training."""
    from vlm_lightning.models import apply_lora

    torch.manual_seed(seed)
    peft_model = apply_lora(model, r=4, lora_alpha=8, finetune_vision_layers=True, finetune_projector=True,
                            init_lora_weights=False, gradient_checkpointing=False, lora_dtype="float32")
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.05 * torch.randn_like(p))
    return peft_model.eval()


def _inputs(processor):
    img = Image.new("RGB", (56, 56), (200, 30, 90))
    for x in range(0, 56, 7):
        for y in range(0, 56, 5):
            img.putpixel((x, y), (x * 4, y * 4, 255 - x))
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                             {"type": "text", "text": "What is written?"}]}]
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                         add_generation_prompt=True)


def _tiny(tiny_vlm_dir, family):
    try:
        return tiny_vlm_dir(family)
    except NotImplementedError as err:  # fixture families arrive in stages
        pytest.skip(str(err))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_merge_reloads_and_matches_peft_logits(tiny_vlm_dir, tmp_path, family):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = _tiny(tiny_vlm_dir, family)
    processor = AutoProcessor.from_pretrained(base)
    peft_model = _lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32))
    batch = _inputs(processor)
    with torch.no_grad():
        want = peft_model(**batch).logits
        plain = peft_model.get_base_model()
        with peft_model.disable_adapter():
            base_logits = plain(**batch).logits
    assert (want - base_logits).abs().max() > 1e-3, "adapter is a no-op: the test would prove nothing"

    out = merge_lora(peft_model, tmp_path / "merged", dtype="float32", max_shard_size="200KB")

    names = {p.name for p in out.iterdir()}
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert any(n.startswith(("preprocessor_config", "processor_config")) for n in names)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == json.loads((base / "config.json").read_text())["architectures"]
    assert "quantization_config" not in cfg

    merged, info = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    reloaded_proc = AutoProcessor.from_pretrained(out)
    assert reloaded_proc.tokenizer.chat_template == processor.tokenizer.chat_template or reloaded_proc.chat_template
    with torch.no_grad():
        got = merged(**_inputs(reloaded_proc)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_merge_from_adapter_folder_and_bf16_default(tiny_vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = tiny_vlm_dir("qwen2_vl")
    peft_model = _lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), seed=1)
    peft_model.save_pretrained(tmp_path / "adapter")  # records base_model_name_or_path = base
    batch = _inputs(AutoProcessor.from_pretrained(base))
    with torch.no_grad():
        want = peft_model(**batch).logits

    out = merge_lora(tmp_path / "adapter", tmp_path / "merged")  # processor taken from the base folder
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert next(merged.parameters()).dtype == torch.bfloat16
    assert json.loads((out / "merge_info.json").read_text())["base_weights"] == "reloaded"
    with torch.no_grad():
        got = merged.float()(**batch).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # bf16 rounding only


def test_nan_adapter_raises_and_writes_nothing(tiny_vlm_dir, tmp_path):
    from transformers import AutoModelForImageTextToText

    base = tiny_vlm_dir("qwen2_vl")
    peft_model = _lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32))
    layer = peft_model.base_model.model.model.language_model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        merge_lora(peft_model, tmp_path / "merged", dtype="float32")
    assert not (tmp_path / "merged").exists()


def test_inf_in_base_raises(tiny_vlm_dir, tmp_path):
    from vlm_lightning.export.merge import check_finite

    with pytest.raises(ValueError, match="'w'.*NaN/Inf"):
        check_finite({"ok": torch.zeros(2), "w": torch.tensor([1.0, float("inf")])})


def test_4bit_base_merges_into_reloaded_16bit_weights(tiny_vlm_dir, tmp_path):
    """A QLoRA model: the merge reloads the 16-bit base from name_or_path (no quantisation error)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = tiny_vlm_dir("qwen2_vl")
    batch = _inputs(AutoProcessor.from_pretrained(base))
    from vlm_lightning.models import load_vlm

    model_4bit, _ = load_vlm(str(base), quantization="4bit", dtype="float32")  # language model in NF4
    assert any(type(m).__name__ == "Linear4bit" for m in model_4bit.modules())
    peft_4bit = _lora(model_4bit, seed=3)
    peft_16 = _lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), seed=3)
    with torch.no_grad():
        want = peft_16(**batch).logits  # same adapter on the exact 16-bit base

    out = merge_lora(peft_4bit, tmp_path / "merged", dtype="float32")
    assert json.loads((out / "merge_info.json").read_text())["base_weights"] == "reloaded"
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-4, rtol=0)

    # No 16-bit source: dequantise-and-merge, with a warning; equals the 4-bit PEFT model's output.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out2 = merge_lora(peft_4bit, tmp_path / "merged_deq", dtype="float32",
                          base_name_or_path=str(tmp_path / "missing"), processor=AutoProcessor.from_pretrained(base))
    assert any("dequantised" in str(w.message) for w in caught)
    assert json.loads((out2 / "merge_info.json").read_text())["base_weights"] == "dequantized"
    merged2, info = AutoModelForImageTextToText.from_pretrained(out2, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        torch.testing.assert_close(merged2(**batch).logits, peft_4bit(**batch).logits, atol=1e-4, rtol=0)


def test_bad_inputs_name_the_problem(tiny_vlm_dir, tmp_path):
    base = tiny_vlm_dir("qwen2_vl")
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_lora(base, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="adapter folder"):
        merge_lora(tmp_path / "nope", tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        merge_lora(base, tmp_path / "x", dtype="int8")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_gpu_merges_into_16bit_base(tiny_vlm_dir, tmp_path):
    """The real QLoRA case: bitsandbytes NF4 on CUDA, bf16 compute; the merge reloads the 16-bit base on CPU
    and equals the same adapter applied to the 16-bit model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.models import load_vlm

    base = tiny_vlm_dir("qwen2_5_vl")
    batch = _inputs(AutoProcessor.from_pretrained(base))
    model_4bit, _ = load_vlm(str(base), quantization="4bit", dtype="bfloat16", device_map={"": 0})
    peft_4bit = _lora(model_4bit, seed=5)
    out = merge_lora(peft_4bit, tmp_path / "merged", dtype="float32")
    assert json.loads((out / "merge_info.json").read_text())["base_weights"] == "reloaded"
    peft_16 = _lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), seed=5)
    # same adapter values: copy the GPU adapter over (the seeds draw on different devices)
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(peft_16, {k: v.float().cpu() for k, v in get_peft_model_state_dict(peft_4bit).items()})
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, peft_16.eval()(**batch).logits, atol=1e-4, rtol=0)


def test_mllama_cross_attention_lora_merges_exactly(tiny_vlm_dir, tmp_path):
    """Llama 3.2 Vision with LoRA on the cross-attention q/k/v/o alone: the merged model's logits on an image prompt
    equal the LoRA model's (fp32), and exactly those weights changed (the gates and everything else are the base's)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.models import apply_lora

    base = _tiny(tiny_vlm_dir, "mllama")
    processor = AutoProcessor.from_pretrained(base)
    torch.manual_seed(0)
    peft_model = apply_lora(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), r=4,
                            finetune_language_layers=False, init_lora_weights=False, gradient_checkpointing=False,
                            lora_dtype="float32").eval()
    batch = _inputs(processor)
    assert batch["pixel_values"].shape[:3] == (1, 1, 2)  # one image of 2 tiles
    with torch.no_grad():
        want = peft_model(**batch).logits
        with peft_model.disable_adapter():
            assert (want - peft_model.get_base_model()(**batch).logits).abs().max() > 1e-3
    out = merge_lora(peft_model, tmp_path / "merged", dtype="float32")
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, want, atol=1e-4, rtol=0)
    stock = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).state_dict()
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, stock[k])}
    assert changed == {f"model.language_model.layers.{i}.cross_attn.{m}.weight"
                       for i in merged.config.text_config.cross_attention_layers
                       for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
