"""Checkpointing modes "lean" and "offload" (``vlm_lightning.models.checkpointing``) are exact: the same loss
and LoRA gradients as full checkpointing, with kernels and the fused LoRA forward stacked on them; the recompute
really skips the frozen ``down_proj`` GEMM (its base layer runs once per layer, not twice) and runs the layer
again; Gemma 3 (a norm after the MLP reads ``down_proj``'s output) keeps the GEMM and is still exact. Speed and
memory are measured only in benchmarks/bench_sft_step.py (arms ``*_lean``, ``*_offload``)."""
from __future__ import annotations

import copy
import pickle
from collections import Counter

import pytest
import torch
from transformers import AutoModelForImageTextToText

from vlm_lightning.models import apply_lora
from vlm_lightning.models.families import get_family_spec
from vlm_lightning.models.hf import unwrap_model
from vlm_lightning.models.levers import apply_speed_levers, parse_checkpointing
from vlm_lightning.models.patch import apply_kernels, patched_tags


@pytest.fixture(scope="module")
def batches(tiny_vlm_dir, tmp_path_factory):
    """{family: (tiny model dir, one collated batch of 2 demo OCR rows with images)}."""
    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    paths = make_demo_ocr_dataset(tmp_path_factory.mktemp("ocr_ckpt"), n_train=2, n_val=1)
    out = {}
    for family in ("qwen2_5_vl", "gemma3"):
        path = tiny_vlm_dir(family)
        dm = VisionChatDataModule(str(path), train=str(paths["train"]), batch_size=2)
        dm.setup("fit")
        out[family] = path, next(iter(dm.train_dataloader()))
    return out


def _model(path, mode, kernels=False, fused_lora=False):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    if kernels:
        apply_kernels(model)
    peft_model = apply_lora(model, r=4, init_lora_weights=False, gradient_checkpointing=True)
    apply_speed_levers(peft_model, fused_lora=fused_lora, gradient_checkpointing=mode)
    peft_model.train()
    return peft_model


def _step(model, batch):
    """(loss, {trainable name: grad}, Counter of base-layer calls of each decoder layer's down_proj)."""
    hf = unwrap_model(model)
    layers = hf.get_submodule(get_family_spec(hf).decoder_layers)
    calls = Counter()
    hooks = [layer.mlp.down_proj.base_layer.register_forward_hook(lambda *a, i=i: calls.update([i]))
             for i, layer in enumerate(layers)]
    loss = model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads, calls


def _assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-5, msg=name)


def test_modes_parse():
    assert parse_checkpointing("lean") == "lean"
    assert parse_checkpointing("OFFLOAD") == "offload"


@pytest.mark.parametrize("mode", ["lean", "offload"])
def test_lean_and_offload_are_exact_and_skip_the_down_proj_gemm(batches, mode):
    path, batch = batches["qwen2_5_vl"]
    full = _step(_model(path, "full"), batch)
    ours = _step(_model(path, mode), batch)
    _assert_same(ours, full)
    assert set(full[2].values()) == {2}  # full checkpointing: forward + recompute
    assert set(ours[2].values()) == {1}  # ours: the recompute skipped the frozen GEMM in every layer
    grads_moved = [g.abs().sum() > 0 for n, g in ours[1].items() if "down_proj.lora_A" in n]
    assert grads_moved and all(grads_moved)  # the skipped layer's LoRA still gets its gradient


def test_offload_stacks_on_kernels_and_fused_lora(batches):
    path, batch = batches["qwen2_5_vl"]
    full = _step(_model(path, "full", kernels=True, fused_lora=True), batch)
    model = _model(path, "offload", kernels=True, fused_lora=True)
    down = unwrap_model(model).model.language_model.layers[0].mlp.down_proj
    assert {"fused_lora", "recompute_skip"} <= set(patched_tags(down))
    _assert_same(_step(model, batch), full)


def test_gemma3_keeps_the_gemm_behind_its_post_mlp_norm_and_is_exact(batches):
    path, batch = batches["gemma3"]
    full = _step(_model(path, "full"), batch)
    ours = _step(_model(path, "lean"), batch)
    _assert_same(ours, full)
    assert set(ours[2].values()) == {2}  # no skip: post_feedforward_layernorm reads down_proj's output


def test_eval_forward_is_the_plain_forward_and_the_model_copies(batches):
    path, batch = batches["qwen2_5_vl"]
    model = _model(path, "offload")
    with torch.no_grad():
        train_loss = model(**batch).loss
    model.eval()
    with torch.no_grad():
        eval_loss = model(**batch).loss
    torch.testing.assert_close(train_loss, eval_loss)
    clone = copy.deepcopy(model)  # a reference policy copy gets a stash of its own
    layer = unwrap_model(clone).model.language_model.layers[0]
    assert layer._vlm_checkpoint[0] is not unwrap_model(model).model.language_model.layers[0]._vlm_checkpoint[0]
    pickle.loads(pickle.dumps(layer._vlm_checkpoint[0]))


@pytest.mark.cuda
def test_offload_on_the_gpu_is_exact_with_two_forwards_before_one_backward(batches):
    """The pinned host copies, the side stream and the prefetch (CUDA only): two micro-batches' forwards, then
    one backward of their summed losses, equal full checkpointing."""
    path, batch = batches["qwen2_5_vl"]
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    results = []
    for mode in ("full", "offload"):
        model = _model(path, mode).cuda()
        loss = model(**batch).loss + 0.5 * model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                        if p.requires_grad}))
    _assert_same(results[1], results[0])
