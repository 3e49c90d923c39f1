"""The update half of a GRPO step (vlm_lightning.modules.grpo_step) on tiny random VLMs (CPU, fp32), driven through
``VisionGRPOModule.training_step`` with the optimizer stubbed (gradients accumulate, weights stay):

  * cached vision features give the uncached step's loss and LoRA gradients (Qwen M-RoPE, two-image rows);
  * num_iterations=1 needs no old-log-prob forward and beta=0 no reference forward (forwards counted);
  * token-sized, uneven micro-batches give the one-batch loss and gradient (bnpo, grpo);
  * the SFT levers (fused LoRA, no-grad frozen tower, selective checkpointing) change neither the rollout nor
    the gradients;
  * the fast engine's rollout correction and its mismatch metrics.
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.modules.test_grpo import _mock_generate, _module, _NoStep, _rows
from vlm_lightning.data.collate import VisionChatCollator
from vlm_lightning.losses.grpo import GRPOLossConfig
from vlm_lightning.modules import grpo_step


def _step(m, rows, lora_b=0.01):
    """One training_step with the optimizer stubbed: (loss, {LoRA parameter: grad})."""
    if lora_b is not None:
        with torch.no_grad():
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.fill_(lora_b)  # B != 0, so lora_A gets a gradient too
    m.optimizers = lambda: _NoStep()
    m.lr_schedulers = lambda: None
    m._trainer = None
    m.manual_backward = lambda loss: loss.backward()
    m.log_dict = m.log = lambda *a, **k: None
    m.clip_gradients = lambda *a, **k: None
    loss = m.training_step(VisionChatCollator(m.processor, for_generation=True)(rows), 0)
    return float(loss), {n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None}


def _two_image_rows():
    rows = _rows(2)  # a two-image row next to a one-image row: M-RoPE positions and feature splits differ
    rows[1]["messages"][0]["content"].insert(0, {"type": "image", "image": Image.new("RGB", (56, 84), "red")})
    return rows


def _max_diff(a, b):
    assert a.keys() == b.keys() and a
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.mark.parametrize("family", ["qwen2_5_vl"])  # M-RoPE; other families: tests/rollout/test_vision_cache.py
def test_cached_vision_features_give_the_uncached_loss_and_gradients(tiny_vlm_dir, family):
    path, results = tiny_vlm_dir(family), {}  # built before seeding: building draws random numbers
    for cache in (False, True):
        torch.manual_seed(0)
        m = _module(path, num_generations=3, max_new_tokens=3, num_iterations=2, beta=0.05,
                    generations_per_micro_batch=2, cache_vision_features=cache)  # micro-batches of 2 and 1 tiles
        torch.manual_seed(1)  # the same sampled completions in both runs (the fast engine's prefill: B prompts)
        results[cache] = (*_step(m, _two_image_rows()), m.last_rollout_stats["vision_cache"], m)
    (loss0, g0, stats0, _), (loss1, g1, stats1, m1) = results[False], results[True]
    assert stats0 is None
    # the rollout's prefill computes once; 2 micro-batches x (old + ref + 2 policy passes) reuse
    assert stats1 == {"computed": 1, "reused": 8, "passed_through": 0}, stats1
    assert abs(loss1 - loss0) <= 1e-5 * max(1.0, abs(loss0)), (loss0, loss1)
    for n in g0:  # |diff| <= 1e-5 + 1e-5 |g|: measured 0 (bit-identical) on CPU fp32
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5)
    print(f"{family}: cached vs uncached |loss diff| {abs(loss1 - loss0):.3g} (loss {loss0:.4g}), "
          f"max |grad diff| {_max_diff(g0, g1):.3g} (max |grad| {max(float(g.abs().max()) for g in g0.values()):.3g})")
    assert any("lora_A" in n for n in g1) and any("lora_B" in n for n in g1)
    # the fast engine sampled, so "auto" corrected with TIS; in fp32 the engines agree (KL ~ 0, ratio ~ 1)
    metrics = m1.last_rollout_metrics
    assert metrics["rollout_correction/kl"] < 1e-6
    assert abs(metrics["rollout_correction/ratio_max"] - 1) < 1e-3 and metrics["rollout_correction/clipped_frac"] == 0


def test_a_trainable_vision_tower_runs_uncached(tiny_vlm_dir):
    torch.manual_seed(0)
    m = _module(tiny_vlm_dir("qwen2_vl"), num_generations=2, max_new_tokens=2, finetune_vision_layers=True)
    _step(m, _rows(2))
    assert m.last_rollout_stats["vision_cache"] is None
    assert any("visual" in n and "lora_" in n for n in _step(m, _rows(2))[1])


def _configure(m, **hp):
    """Switch step options of a built module (so one model serves several cases); gradients cleared."""
    m.hparams.update(hp)
    fields = ("loss_type", "beta", "num_generations", "importance_sampling_level", "scale_rewards", "epsilon",
              "epsilon_high", "delta", "max_completion_length")
    m.loss_config = GRPOLossConfig(**({k: getattr(m.loss_config, k) for k in fields}
                                      | {k: v for k, v in hp.items() if k in fields}))
    m.model.zero_grad(set_to_none=True)


def test_old_and_reference_forwards_only_when_needed(tiny_vlm_dir, monkeypatch):
    calls = []
    real = grpo_step.completion_logprobs
    monkeypatch.setattr(grpo_step, "completion_logprobs", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    m = _module(tiny_vlm_dir("qwen2_vl"), num_generations=2, generations_per_micro_batch=1)
    a, eos = m.tokenizer.convert_tokens_to_ids("1"), m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _mock_generate(m, [[a, eos], [a, a], [eos, a], [a, eos]])
    # 2 micro-batches: num_iterations x 2 policy forwards, + 2 old (num_iterations > 1), + 2 reference (beta > 0)
    for num_iterations, beta, forwards in ((1, 0.0, 2), (2, 0.0, 2 + 4), (1, 0.1, 2 + 2)):
        _configure(m, num_iterations=num_iterations, beta=beta)
        calls.clear()
        _step(m, _rows(2))
        assert len(calls) == forwards, (num_iterations, beta)


def test_token_sized_micro_batches_give_the_one_batch_loss_and_gradient(tiny_vlm_dir):
    torch.manual_seed(0)
    m = _module(tiny_vlm_dir("qwen2_vl"), num_generations=3)
    a, eos = m.tokenizer.convert_tokens_to_ids("1"), m.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # tiles of different longest completions (4, 2, 1 tokens), so trimming and the token budget matter
    _mock_generate(m, [[a, a, a, eos], [a, eos, a, a], [a, eos, a, a], [eos, a, a, a], [eos, a, a, a],
                       [eos, a, a, a]])
    splits = (dict(generations_per_micro_batch=None, max_tokens_per_micro_batch=None),  # one micro-batch
              dict(generations_per_micro_batch=None, max_tokens_per_micro_batch=1),  # tiles alone: widths 4, 2, 1
              dict(generations_per_micro_batch=2, max_tokens_per_micro_batch=None))  # uneven: 2 tiles + 1 tile
    for loss_type in ("bnpo", "grpo"):  # token- and row-normalised; all four: tests/losses/test_rollout_correction.py
        results = []
        for split in splits:
            _configure(m, loss_type=loss_type, **split)
            results.append((*_step(m, _rows(2)), m.last_rollout_metrics["micro_batches"]))
        (loss0, g0, _), *rest = results
        assert [n for *_, n in results] == [1, 3, 2]
        for loss, g, _ in rest:
            assert abs(loss - loss0) <= 1e-5 * max(1.0, abs(loss0)), (loss_type, loss0, loss)
            for n in g0:
                torch.testing.assert_close(g[n], g0[n], atol=1e-5, rtol=1e-5, msg=f"{loss_type} {n}")


def test_speed_levers_keep_the_rollout_and_the_gradients(tiny_vlm_dir):
    path = tiny_vlm_dir("qwen2_5_vl")
    levers = dict(fused_lora=True, frozen_vision_no_grad=True, gradient_checkpointing="every_2")
    out = {}
    for name, kw in (("off", dict(gradient_checkpointing=False)), ("on", levers)):
        torch.manual_seed(0)
        m = _module(path, num_generations=2, max_new_tokens=3, beta=0.05, **kw)
        with torch.no_grad():
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        batch = VisionChatCollator(m.processor, for_generation=True)(_rows(2))
        greedy = {}
        for backend in ("fast", "hf"):  # the fast engine merges LoRA under the fused forward; HF runs it
            m.rollout_backend = backend
            greedy[backend] = m.generate_completions(batch, 2, greedy=True)[1].completion_ids
        m.rollout_backend = "auto"
        torch.manual_seed(1)
        out[name] = (greedy, *_step(m, _rows(2), lora_b=None))
    (greedy0, loss0, g0), (greedy1, loss1, g1) = out["off"], out["on"]
    assert torch.equal(greedy0["fast"], greedy0["hf"])
    assert torch.equal(greedy1["fast"], greedy0["fast"]) and torch.equal(greedy1["hf"], greedy0["hf"])
    assert abs(loss1 - loss0) <= 1e-5 and _max_diff(g0, g1) <= 1e-5


def test_rollout_correction_off_and_on_the_hf_path(tiny_vlm_dir):
    torch.manual_seed(0)
    m = _module(tiny_vlm_dir("qwen2_vl"), num_generations=2, max_new_tokens=2, rollout_correction=None)
    _step(m, _rows(2))
    keys = set(m.last_rollout_metrics)
    assert "rollout_correction/kl" in keys and "rollout_correction/clipped_frac" not in keys  # diagnostics only
    m = _module(tiny_vlm_dir("qwen2_vl"), num_generations=2, max_new_tokens=2, rollout_correction="mis",
                rollout_backend="hf")
    _step(m, _rows(2))
    assert not any(k.startswith("rollout_correction/") for k in m.last_rollout_metrics)  # HF: no engine log-probs
    with pytest.raises(ValueError, match="rollout_correction_cap"):
        _module(tiny_vlm_dir("qwen2_vl"), rollout_correction_cap=0.0)
    with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
        _module(tiny_vlm_dir("qwen2_vl"), max_tokens_per_micro_batch=0)
