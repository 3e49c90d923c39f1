"""apply_kernels on every tiny family: patched logits, loss, gradients and KV-cache generation equal the
unpatched model's (fp32, 1e-4); idempotent; other models in the process untouched; PEFT-wrapped works.

Run with TRITON_INTERPRET=1 so the Triton kernels (not their torch fallbacks) are what gets compared.
"""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_lightning.kernels._utils import triton_ok
from vlm_lightning.losses.sft import token_loss
from vlm_lightning.models.hf import final_logit_softcap, lm_head_weight
from vlm_lightning.models.patch import apply_kernels, patched_tags

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mistral3_small", "qwen3_vl",
            "mllama"]
pytestmark = [
    pytest.mark.skipif(not triton_ok(torch.zeros(1)), reason="needs TRITON_INTERPRET=1 (or a GPU)"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]


@pytest.fixture(scope="module")
def tiny_dir(request, tmp_path_factory):
    """The shared ``tiny_vlm_dir`` factory when conftest provides it, else build with make_tiny_vlm."""
    try:
        factory = request.getfixturevalue("tiny_vlm_dir")
    except pytest.FixtureLookupError:
        from vlm_lightning.models.tiny import make_tiny_vlm

        root = tmp_path_factory.mktemp("tiny_kernels")
        cache = {}

        def factory(family):
            if family not in cache:
                cache[family] = make_tiny_vlm(family, root / family)
            return cache[family]

    def get(family):
        try:
            return factory(family)
        except NotImplementedError as e:
            pytest.skip(str(e))

    return get


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path)


def _batch(processor, with_labels=True):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["Read the text.", "What is written here, exactly? Answer briefly."]
    answers = ["HELLO 42", "no"]
    prompts = []
    for t, a in zip(texts, answers):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]},
                {"role": "assistant", "content": [{"type": "text", "text": a}]}]
        prompts.append(processor.apply_chat_template(msgs, tokenize=False))
    batch = dict(processor(text=prompts, images=[[im] for im in images], return_tensors="pt", padding=True))
    if with_labels:
        labels = batch["input_ids"].clone()
        labels[:, : labels.shape[1] * 2 // 3] = -100  # prompt + image tokens ignored, tail scored
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
def test_patched_family_matches_unpatched(family, tiny_dir):
    model, processor = _load(tiny_dir(family))
    batch = _batch(processor)
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        ref_logits = model(**no_labels).logits
    ref_loss, ref_grads = _loss_and_grads(model, batch)

    patched = copy.deepcopy(model)
    counts = apply_kernels(patched)
    assert counts["rms_norm"] > 0 and counts["rope"] > 0 and counts["mlp"] > 0 and counts["cross_entropy"] == 1
    assert apply_kernels(patched) == counts  # idempotent
    patched.eval()
    with torch.no_grad():
        logits = patched(**no_labels).logits
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    loss, grads = _loss_and_grads(patched, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")

    # the unpatched model still runs HF's own modules (the RoPE dispatcher is only active in patched ones)
    assert not any(type(m).__name__.startswith("Fused") for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**no_labels).logits, ref_logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "mistral3", "qwen3_vl", "mllama"])
def test_generation_with_kv_cache_same_tokens(family, tiny_dir):
    model, processor = _load(tiny_dir(family))
    batch = _batch(processor, with_labels=False)
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    ref = model.generate(**batch, **kw)
    patched = copy.deepcopy(model)
    apply_kernels(patched)
    torch.testing.assert_close(patched.generate(**batch, **kw), ref, rtol=0, atol=0)


def test_peft_model_with_checkpointing_and_fused_token_loss(tiny_dir):
    from peft import LoraConfig, get_peft_model

    model, processor = _load(tiny_dir("qwen2_5_vl"))
    batch = _batch(processor)
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj|up_proj)$",
                     init_lora_weights=False)
    peft_ref = get_peft_model(copy.deepcopy(model), cfg)
    peft_fused = copy.deepcopy(peft_ref)
    counts = apply_kernels(peft_fused)
    for m in (peft_ref, peft_fused):  # as VisionSFTModule trains: recompute goes through the patched modules
        m.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert counts["mlp"] > 0
    ref_loss, ref_grads = _loss_and_grads(peft_ref, batch)
    loss, grads = _loss_and_grads(peft_fused, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-4)
    assert ref_grads and grads.keys() == ref_grads.keys()  # only LoRA weights train; lm_head frozen
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-4)

    # the SFT path: last hidden state from the decoder, loss from the fused head
    base = peft_fused.get_base_model()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs).last_hidden_state
    head, cap = lm_head_weight(peft_fused), final_logit_softcap(peft_fused)
    torch.testing.assert_close(token_loss(hidden, batch["labels"], head, softcap=cap, fused=True), ref_loss,
                               rtol=1e-4, atol=1e-4)
    n_items = int((batch["labels"][:, 1:] != -100).sum()) * 2  # as if a second micro-batch followed
    half = token_loss(hidden, batch["labels"], head, softcap=cap, normalizer=n_items, fused=True)
    torch.testing.assert_close(half, ref_loss / 2, rtol=1e-4, atol=1e-4)


def test_qwen3_vl_interleaved_mrope_qk_norms_and_deepstack_are_patched(tiny_dir):
    """Qwen3-VL's rotary embedding interleaves the (t, h, w) sections into cos/sin before
    ``apply_rotary_pos_emb``, so the rotate-half RoPE kernel applies unchanged (the logits test above holds it
    to HF's); its q_norm/k_norm are Llama-style RMSNorms over head_dim, and the deepstack mergers' LayerNorms
    run the LayerNorm kernel."""
    model, _ = _load(tiny_dir("qwen3_vl"))
    text, vision = model.config.text_config, model.config.vision_config
    counts = apply_kernels(model)
    layers = text.num_hidden_layers
    assert counts["rope"] == counts["mlp"] == layers
    assert counts["rms_norm"] == 4 * layers + 1  # input, post-attention, q_norm, k_norm; final norm
    assert counts["layer_norm"] == 2 * vision.depth + 1 + len(vision.deepstack_visual_indexes)
    attn = model.model.language_model.layers[0].self_attn
    assert "rms_norm" in patched_tags(attn.q_norm) and "rope" in patched_tags(attn)


def test_mllama_what_is_patched(tiny_dir):
    """Llama 3.2 Vision: the self-attention layers get the RoPE kernel (the cross-attention has no RoPE, so its
    module is left alone), every decoder layer's SwiGLU MLP and Llama RMSNorm (the cross-attention's q_norm/k_norm
    too) the fused ones, the vision encoders' LayerNorms the LayerNorm kernel; the gates are untouched parameters."""
    model, _ = _load(tiny_dir("mllama"))
    text, vision = model.config.text_config, model.config.vision_config
    counts = apply_kernels(model)
    n_cross = len(text.cross_attention_layers)
    n_self = text.num_hidden_layers - n_cross
    assert counts["rope"] == n_self and counts["mlp"] == text.num_hidden_layers
    assert counts["rms_norm"] == 2 * text.num_hidden_layers + 2 * n_cross + 1  # + q/k norms of cross_attn, final
    assert counts["layer_norm"] == 2 * (vision.num_hidden_layers + vision.num_global_layers) + 2  # + pre/post
    layers = model.model.language_model.layers
    cross = layers[text.cross_attention_layers[0]]
    assert "rope" not in patched_tags(cross.cross_attn) and "rms_norm" in patched_tags(cross.cross_attn.q_norm)
