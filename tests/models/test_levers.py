"""Speed levers of ``vlm_lightning.models.levers`` (and ``models.lora.fuse_lora_forward``) are exact: each
gives the same loss and the same LoRA gradients as the plain PEFT model with full checkpointing (fp32, tiny
Qwen2.5-VL), and each visibly takes effect (the frozen tower runs once instead of twice, the fused LoRA path
runs, each checkpointing mode recomputes exactly the sub-blocks it names). Speed itself is measured only in
benchmarks/bench_sft_step.py."""
from __future__ import annotations

from collections import Counter

import lightning as L
import pytest
import torch
import torch.nn as nn
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_lightning.models import apply_lora
from vlm_lightning.models.levers import apply_speed_levers, freeze_vision_autograd, parse_checkpointing
from vlm_lightning.models.lora import fuse_lora_forward
from vlm_lightning.models.patch import apply_kernels, patched_tags

FAMILY = "qwen2_5_vl"  # the benchmark's family; its projector (merger) sits inside the vision tower
LAYERS = "base_model.model.model.language_model.layers"


@pytest.fixture(scope="module")
def data(tiny_vlm_dir, tmp_path_factory):
    """(tiny Qwen2.5-VL dir, one collated batch of 2 demo OCR rows with images)."""
    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    path = tiny_vlm_dir(FAMILY)
    paths = make_demo_ocr_dataset(tmp_path_factory.mktemp("ocr_levers"), n_train=2, n_val=1)
    dm = VisionChatDataModule(str(path), train=str(paths["train"]), batch_size=2)
    dm.setup("fit")
    return path, next(iter(dm.train_dataloader()))


def _peft(path, lora_kwargs=None, kernels=False, **levers):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    if kernels:
        apply_kernels(model)
    lora_kwargs = {"gradient_checkpointing": True, **(lora_kwargs or {})}
    peft_model = apply_lora(model, r=4, init_lora_weights=False, **lora_kwargs)  # non-zero B: real gradients
    applied = apply_speed_levers(peft_model, **levers) if levers else None
    peft_model.train()
    return peft_model, applied


def _step(peft_model, batch, count: dict[str, str] | None = None):
    """(loss, {trainable name: grad}, {tag: forward calls}) of one forward + backward; ``count`` maps a tag
    to a module path whose calls (recomputes included) are counted."""
    calls = Counter()
    hooks = [peft_model.get_submodule(p).register_forward_hook(lambda *a, t=t: calls.update([t]))
             for t, p in (count or {}).items()]
    loss = peft_model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads, calls


def _assert_same(a, b, atol=1e-6):
    loss_a, grads_a, _ = a
    loss_b, grads_b, _ = b
    torch.testing.assert_close(loss_a, loss_b, atol=atol, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------- 1. frozen vision tower
VISION_QKV = "base_model.model.model.visual.blocks.0.attn.qkv"


def test_frozen_vision_no_grad_is_exact_and_skips_recompute(data):
    path, batch = data
    ref = _step(_peft(path)[0], batch, {"vision": VISION_QKV})
    model, applied = _peft(path, frozen_vision_no_grad=True)
    out = _step(model, batch, {"vision": VISION_QKV})
    assert applied["vision_no_grad"] is True
    _assert_same(ref, out)
    # under checkpointing the frozen tower was recomputed (and backpropagated) for nothing; now it runs once
    assert ref[2]["vision"] == 2 and out[2]["vision"] == 1
    assert torch.is_grad_enabled()


def test_frozen_vision_no_grad_keeps_a_trainable_projector_training(data):
    """Qwen's merger sits inside the tower: it must still run with grad (and its output reordering too)."""
    path, batch = data
    ref = _step(_peft(path, {"finetune_projector": True})[0], batch)
    model, applied = _peft(path, {"finetune_projector": True}, frozen_vision_no_grad=True)
    out = _step(model, batch)
    assert applied["vision_no_grad"] is True
    merger = [n for n in out[1] if ".visual.merger." in n]
    assert merger and all(out[1][n].abs().sum() > 0 for n in merger)
    _assert_same(ref, out)


def test_frozen_vision_no_grad_keeps_qwen3_vl_deepstack_mergers_training(tiny_vlm_dir):
    """Qwen3-VL's deepstack mergers sit inside the tower too, beside the merger: with the projector trained, the
    lever stays on and both get the plain model's gradients."""
    from vlm_lightning.data import VisionChatCollator
    from vlm_lightning.data.formats import normalize_row

    path = tiny_vlm_dir("qwen3_vl")
    row = normalize_row({"image": Image.new("RGB", (112, 56), (200, 30, 30)), "text": "42"}, 0)
    batch = VisionChatCollator(AutoProcessor.from_pretrained(path))([row])
    ref = _step(_peft(path, {"finetune_projector": True})[0], batch)
    model, applied = _peft(path, {"finetune_projector": True}, frozen_vision_no_grad=True)
    out = _step(model, batch)
    assert applied["vision_no_grad"] is True
    for part in (".visual.merger.", ".visual.deepstack_merger_list.0."):
        names = [n for n in out[1] if part in n]
        assert names and all(out[1][n].abs().sum() > 0 for n in names), part
    _assert_same(ref, out)


def test_frozen_vision_no_grad_turns_itself_off_for_vision_lora(data):
    path, batch = data
    ref = _step(_peft(path, {"finetune_vision_layers": True})[0], batch)
    model, applied = _peft(path, {"finetune_vision_layers": True}, frozen_vision_no_grad=True)
    out = _step(model, batch)
    assert applied["vision_no_grad"] is False
    vision_lora = [n for n in out[1] if ".visual.blocks." in n]
    assert vision_lora and all(out[1][n].abs().sum() > 0 for n in vision_lora)
    _assert_same(ref, out)


def test_frozen_vision_no_grad_restores_grad_mode_after_an_error(data):
    path, _ = data
    model, _ = _peft(path)
    assert freeze_vision_autograd(model) is True
    with pytest.raises(RuntimeError):  # a bad input: the tower's forward raises half way
        model.get_submodule("base_model.model.model.visual")(torch.zeros(3, 5), grid_thw=torch.ones(1, 3).long())
    assert torch.is_grad_enabled()


# ------------------------------------------------------------------------------------ 2. fused LoRA
class _Toy(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.proj = nn.Linear(37, 53, bias=bias)  # odd shapes

    def forward(self, x):
        return self.proj(x)


def _toy_peft(bias=True, dropout=0.0, quantized=False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _Toy(bias)
    if quantized:
        bnb = pytest.importorskip("bitsandbytes")
        q = bnb.nn.Linear4bit(37, 53, bias=bias, compute_dtype=torch.float32, quant_type="nf4")
        q.load_state_dict(base.proj.state_dict())
        base.proj = q.to("cpu")
    return get_peft_model(base, LoraConfig(r=5, lora_alpha=7, lora_dropout=dropout, target_modules=["proj"],
                                           init_lora_weights=False))


def _lora_grads(model, x, g):
    for p in list(model.parameters()) + [x]:
        p.grad = None
    y = model(x)
    y.backward(g)
    layer = model.base_model.model.proj
    return y.detach(), x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), \
        layer.lora_B["default"].weight.grad.clone(), y.grad_fn


@pytest.mark.parametrize("bias,quantized", [(True, False), (False, False), (True, True)])
def test_fused_lora_equals_peft_forward_and_gradients(bias, quantized):
    model = _toy_peft(bias=bias, quantized=quantized)
    x = torch.randn(3, 11, 37, requires_grad=True)  # (B, T, in)
    g = torch.randn(3, 11, 53)
    ref = _lora_grads(model, x, g)
    assert fuse_lora_forward(model) == 1
    out = _lora_grads(model, x, g)
    assert "Add" in type(ref[4]).__name__ and "Add" not in type(out[4]).__name__  # PEFT's add vs our addmm_
    for a, b in zip(ref[:4], out[:4]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fused_lora_falls_back_to_peft_where_not_exact():
    x = torch.randn(2, 4, 37)
    # dropout > 0 in training: PEFT's forward (same random mask under the same seed)
    model = _toy_peft(dropout=0.5)
    model.train()
    torch.manual_seed(3)
    ref = model(x)
    fuse_lora_forward(model)
    torch.manual_seed(3)
    torch.testing.assert_close(model(x), ref)
    # adapter disabled: the base output
    model = _toy_peft()
    fuse_lora_forward(model)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), model.base_model.model.proj.base_layer(x))
    # LoRA weights in another dtype than the input: PEFT casts, so PEFT's forward runs
    model = _toy_peft()
    layer = model.base_model.model.proj
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.data = p.data.double()
    ref = model(x)
    fuse_lora_forward(model)
    torch.testing.assert_close(model(x), ref)


def test_fused_lora_in_the_vlm_is_exact(data):
    path, batch = data
    ref = _step(_peft(path)[0], batch)
    model, applied = _peft(path, fused_lora=True)
    assert applied["fused_lora"] == sum(1 for n, _ in model.named_modules() if n.endswith("lora_A"))
    _assert_same(ref, _step(model, batch), atol=1e-5)


# ------------------------------------------------------------------------- 3. checkpointing modes
def _layer_counts(n_layers: int) -> dict[str, str]:
    out = {}
    for i in range(n_layers):
        out[f"attn{i}"] = f"{LAYERS}.{i}.self_attn.q_proj.base_layer"
        out[f"mlp{i}"] = f"{LAYERS}.{i}.mlp.down_proj.base_layer"
    return out


# forward calls per step of (attention, MLP) of layer 0 and layer 1: 2 = run + recompute
EXPECTED_CALLS = {"full": (2, 2, 2, 2), "none": (1, 1, 1, 1), "mlp": (1, 2, 1, 2), "attention": (2, 1, 2, 1),
                  "every_2": (2, 2, 1, 1)}


@pytest.mark.parametrize("mode", ["mlp", "attention", "every_2", "none"])
def test_checkpointing_modes_are_exact_and_recompute_what_they_name(data, mode):
    path, batch = data
    counts = _layer_counts(2)
    ref = _step(_peft(path)[0], batch, counts)
    lora = {"gradient_checkpointing": mode != "none"}
    out = _step(_peft(path, lora, gradient_checkpointing=mode)[0], batch, counts)
    _assert_same(ref, out)
    calls = out[2]
    assert (calls["attn0"], calls["mlp0"], calls["attn1"], calls["mlp1"]) == EXPECTED_CALLS[mode]
    assert (ref[2]["attn0"], ref[2]["mlp0"]) == (2, 2)


def test_levers_compose_with_the_fused_kernels(data):
    """The levers stack on the kernels' patched classes (one swap mechanism; the patched attention once called
    ``super(type(self), self).forward``, which recursed under a second subclass). Attention-only checkpointing
    + vision no-grad + fused LoRA on a patched model."""
    path, batch = data
    counts = _layer_counts(1)
    ref = _step(_peft(path, kernels=True)[0], batch, counts)
    model, applied = _peft(path, kernels=True, frozen_vision_no_grad=True, fused_lora=True,
                           gradient_checkpointing="attention")
    out = _step(model, batch, counts)
    _assert_same(ref, out, atol=1e-5)
    assert (out[2]["attn0"], out[2]["mlp0"]) == (2, 1)


def test_levers_survive_deepcopy(data):
    import copy

    path, batch = data
    model, _ = _peft(path, frozen_vision_no_grad=True, fused_lora=True, gradient_checkpointing="mlp")
    clone = copy.deepcopy(model)
    ref = _step(model, batch)
    out = _step(clone, batch)
    _assert_same(ref, out)
    for name, p in model.named_parameters():  # not doubled: the clone's wrappers run the clone's modules
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref[1][name], msg=name)


def test_parse_checkpointing_and_bad_modes():
    assert parse_checkpointing(True) == "full" and parse_checkpointing(False) == "none"
    assert parse_checkpointing("every_1") == "full" and parse_checkpointing("every_3") == "every_3"
    for bad in ("every_0", "every_x", "selective"):
        with pytest.raises(ValueError, match="gradient_checkpointing="):
            parse_checkpointing(bad)
    from vlm_lightning.modules import VisionSFTModule

    with pytest.raises(ValueError, match="gradient_checkpointing='every_x'"):
        VisionSFTModule("tiny:qwen2_5_vl", gradient_checkpointing="every_x")


def test_selective_mode_needs_checkpointing_enabled(data):
    path, _ = data
    with pytest.raises(ValueError, match="not enabled"):
        _peft(path, {"gradient_checkpointing": False}, gradient_checkpointing="every_2")


# ---------------------------------------------------------------------------------------- 4. compile
def test_compiled_layers_with_every_lever_are_exact(data):
    """torch.compile of each decoder layer traces PEFT + fused LoRA + checkpointing (aot_eager: the graph
    capture and autograd of inductor without its CPU code generation, which takes ~30 s here)."""
    torch._dynamo.reset()
    path, batch = data
    ref = _step(_peft(path)[0], batch)
    model, applied = _peft(path, frozen_vision_no_grad=True, fused_lora=True, gradient_checkpointing="every_2",
                           compile_layers="aot_eager")
    assert applied["compiled_layers"] == 2
    _assert_same(ref, _step(model, batch), atol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------------ the module, end to end
def test_sft_module_with_all_levers_trains_like_the_default(data):
    """One optimizer step through the Lightning Trainer moves the LoRA weights exactly as without levers."""
    from torch.utils.data import DataLoader

    from vlm_lightning.modules import VisionSFTModule

    path, batch = data

    def train(**levers):
        torch.manual_seed(0)
        module = VisionSFTModule(str(path), dtype="float32", r=4, init_lora_weights=False,
                                 optimizer=lambda p: torch.optim.SGD(p, lr=1.0), **levers)
        trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, DataLoader([batch], batch_size=None))
        return module, {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}

    _, ref = train()
    module, out = train(frozen_vision_no_grad=True, fused_lora=True, gradient_checkpointing="every_2")
    assert "fused_lora" in patched_tags(module.get_submodule(f"model.{LAYERS}.0.mlp.down_proj"))
    assert module.get_submodule(f"model.{LAYERS}.1").gradient_checkpointing is False
    assert ref.keys() == out.keys()
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next", "pixtral", "gemma3",
                                    "mistral3"])
def test_every_lever_on_every_family_matches_the_plain_model(family, tiny_vlm_dir):
    """The levers and kernels on each family's vision tower (a transformers PreTrainedModel whose outputs,
    e.g. the hidden states the LLaVA-style projectors read, are recorded by class) give the plain logits."""
    from vlm_lightning.models.build import build_model

    path = tiny_vlm_dir(family)
    logits = []
    for levers in ({}, {"frozen_vision_no_grad": True, "fused_lora": True, "use_kernels": True}):
        model, processor = build_model(str(path), dtype="float32", lora={"r": 4}, **levers)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[Image.new("RGB", (112, 112), (40, 90, 200))], return_tensors="pt")
        with torch.no_grad():
            logits.append(model.eval()(**inputs).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-4, rtol=1e-4)
