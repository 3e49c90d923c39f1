"""FSDP (Lightning's FSDPStrategy = torch FSDP1) for VisionSFTModule.

On the CPU: torch 2.14's FSDP refuses ``device_id=None`` without an accelerator ("FSDP needs a non-CPU
accelerator device"), which is what Lightning passes on the CPU; ``VisionFSDPStrategy`` passes the CPU
device explicitly, and FSDP then shards over gloo (all-gather and reduce-scatter both work). So the CPU run
below is a real 2-process FULL_SHARD run: decoder layers wrapped, one rank with text-only batches (frozen
vision tower left in the root unit: no collective depends on images), every LoRA gradient non-zero
summed over the ranks' shards, identical gathered weights, a checkpoint holding the unsharded LoRA weights,
generation from outside a step (``run_unsharded``), and an adapter written from the gathered state that
PEFT loads back. With sharded vision blocks, a text-only rank gives a clear error, not a hang.
GPU: ``tests/gpu/fsdp_smoke.py`` (one device, the SFT recipe's model) via ``tests/gpu/test_gpu_checks.py``.
"""
from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import load_ranks, run_worker


def test_fsdp_cpu_sft_shards_decoder_layers_and_gathers(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("qwen2_vl")
    run_worker(tmp_path, model_dir, "--module", "sft", "--strategy", "fsdp", "--steps", "3",
               "--text-only-rank", "1", "--save-adapter", "--save-checkpoint", "--check-generate")
    r0, r1 = load_ranks(tmp_path)
    assert r0["fsdp_units"] == r1["fsdp_units"] == ["Qwen2VLDecoderLayer"]
    assert all(r0["had_images"]) and not any(r1["had_images"])
    names = sorted(r0["grad_norms"][-1])
    assert names and all("lora_" in n and "_fsdp_wrapped_module" not in n for n in names)
    for n in names:  # each rank holds a shard of the gradient (None when its shard of that tensor is empty)
        total = sum(r["grad_norms"][-1][n] or 0.0 for r in (r0, r1))
        assert total > 0, f"no gradient for {n}"
    assert sorted(r0["weights"]) == sorted(r1["weights"]) == names  # gathered: full tensors, clean names
    for n in names:
        assert torch.equal(r0["weights"][n], r1["weights"][n])
        assert r0["weights"][n].shape == r0["initial"][n].shape
        assert not torch.equal(r0["weights"][n], r0["initial"][n]), f"{n} never moved"
    assert r0["gathered_rank0"] == names and r1["gathered_rank0"] == []  # rank0_only

    # the Lightning checkpoint holds exactly the trainable weights, unsharded, under the module's key names
    ckpt = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert sorted(ckpt) == [f"model.{n}" for n in names]
    for n in names:
        assert torch.equal(ckpt[f"model.{n}"], r0["weights"][n])

    # model calls from outside a step (as the OCR callback makes them) run through run_unsharded
    assert r0["generated"] == r1["generated"] and len(r0["generated"]) == 2
    assert r0["unsharded_loss_sum"] == pytest.approx(r1["unsharded_loss_sum"], rel=1e-5)

    # the adapter written from the gathered state loads onto a fresh base with the trained values
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dir)
    peft = PeftModel.from_pretrained(base, tmp_path / "adapter")
    loaded = dict(peft.named_parameters())
    for n in names:
        assert torch.equal(loaded[n], r0["weights"][n]), n
    # ... and gives the loss the sharded model gave on the same batch
    from transformers import AutoProcessor

    from tests.distributed.ddp_worker import _rows
    from vlm_lightning.data import VisionChatCollator
    from vlm_lightning.losses.sft import token_loss
    from vlm_lightning.models.hf import decoder_hidden_states, final_logit_softcap, model_inputs

    batch = VisionChatCollator(AutoProcessor.from_pretrained(model_dir))(_rows(True, 2, offset=7))
    hf = peft.eval().get_base_model()
    with torch.no_grad():
        hidden = decoder_hidden_states(hf, model_inputs(batch), batch["labels"])
        expected = token_loss(hidden, batch["labels"], hf.get_output_embeddings(), softcap=final_logit_softcap(hf),
                              normalizer=torch.tensor(1.0))
    assert r0["unsharded_loss_sum"] == pytest.approx(float(expected), rel=1e-4)


def test_fsdp_cpu_grpo_manual_optimisation(tmp_path, tiny_vlm_dir):
    """GRPO backpropagates inside training_step, i.e. inside FSDP's root forward, where FSDP's own end-of-
    backward callback never runs; VisionFSDPStrategy finishes those backwards itself. Without that, the
    gather after training fails ("Cannot manually unshard parameters during forward/backward"). On this
    configuration the FSDP run gave bit-identical gradients and weights to the same run under DDP."""
    run_worker(tmp_path, tiny_vlm_dir("qwen2_vl"), "--module", "grpo", "--strategy", "fsdp", "--steps", "2",
               "--text-only-rank", "1")
    r0, r1 = load_ranks(tmp_path)
    names = sorted(r0["grad_norms"][-1])
    for n in names:
        assert sum(r["grad_norms"][-1][n] or 0.0 for r in (r0, r1)) > 0, f"no gradient for {n}"
    for n in names:
        assert torch.equal(r0["weights"][n], r1["weights"][n])
        assert not torch.equal(r0["weights"][n], r0["initial"][n]), f"{n} never moved"


def test_fsdp_sharded_vision_blocks_with_a_text_only_rank_fail_clearly(tmp_path, tiny_vlm_dir):
    code, output = run_worker(tmp_path, tiny_vlm_dir("qwen2_vl"), "--module", "sft", "--strategy", "fsdp",
                              "--steps", "1", "--text-only-rank", "1", "--wrap-vision-blocks", expect_ok=False)
    assert code != 0
    assert "ranks [1] have a batch without images" in output


def test_clip_sharded_grad_norm_without_a_process_group():
    from vlm_lightning.distributed.fsdp import clip_sharded_grad_norm_

    a, b, c = (torch.zeros(1, requires_grad=True) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])  # c has no gradient (an empty shard)
    total = clip_sharded_grad_norm_([a, b, c], max_norm=1.0)
    assert float(total) == pytest.approx(5.0)
    assert a.grad.item() == pytest.approx(0.6, rel=1e-5) and b.grad.item() == pytest.approx(0.8, rel=1e-5)
    total = clip_sharded_grad_norm_([a, b], max_norm=10.0)  # under the limit: unchanged
    assert a.grad.item() == pytest.approx(0.6, rel=1e-5)
    with pytest.raises(NotImplementedError, match="HYBRID_SHARD"):
        clip_sharded_grad_norm_([a], 1.0, "HYBRID_SHARD")
