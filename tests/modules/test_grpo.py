"""VisionGRPOModule on a tiny random Qwen2-VL (CPU, fp32): parameters that move and stay, KL 0 at step 0,
exact EOS / truncation / stop-string masks from a mocked ``generate``, refused configurations."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from PIL import Image

from vlm_lightning.data.collate import VisionChatCollator
from vlm_lightning.modules.grpo import VisionGRPOModule
from vlm_lightning.rewards import CharF1Reward


def spread_reward(prompts, completions, **kw):
    """Differs between almost any two completions, so every group has a non-zero advantage."""
    return [(sum(map(ord, c)) % 97) / 97 for c in completions]


def _rows(n=2):
    rows = []
    for i in range(n):
        img = Image.new("RGB", (56 + 28 * (i % 2), 56), (255 - 40 * i, 255, 255))
        rows.append({"index": i, "messages": [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Read it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": str(10 + i)}]}]})
    return rows


def _module(path, **kw):
    args = dict(reward_funcs=[spread_reward], num_generations=3, max_new_tokens=4, dtype="float32", r=4,
                gradient_checkpointing=False, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0))
    args.update(kw)
    m = VisionGRPOModule(str(path), **args)
    m.configure_model()
    return m


def _fit(module, rows, steps, batch_size=2):
    collator = VisionChatCollator(module.processor, for_generation=True)
    loader = torch.utils.data.DataLoader(rows, batch_size=batch_size, collate_fn=collator)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, loader)
    return trainer


@pytest.fixture(scope="module")
def qwen_dir(tiny_vlm_dir):
    return tiny_vlm_dir("qwen2_vl")


@pytest.mark.parametrize("level,loss_type", [("token", "dapo"), ("sequence", "grpo")])
def test_steps_change_every_lora_param_and_no_base_param(qwen_dir, level, loss_type):
    torch.manual_seed(0)
    m = _module(qwen_dir, importance_sampling_level=level, loss_type=loss_type, num_iterations=2, beta=0.05,
                generations_per_micro_batch=2)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    # 2 rollouts x 2 iterations = 4 optimizer steps; LoRA A moves only once B != 0, i.e. from step 2
    _fit(m, _rows(4), steps=4)
    lora = [n for n in before if "lora_" in n]
    assert lora
    for n, p in m.model.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, before[n]), f"LoRA parameter {n} did not change"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"
    metrics = m.last_rollout_metrics
    for key in ("reward/mean", "reward/std", "reward/spread_reward/mean", "advantages/std", "kl",
                "clip_ratio/region_mean", "completions/mean_length", "completions/truncated_frac", "loss"):
        assert key in metrics and metrics[key] == metrics[key], key  # present and not NaN
    assert m.last_samples and {"completion", "reward", "advantage", "image"} <= set(m.last_samples[0])
    assert m.last_rollout_stats["backend"].startswith("fast")  # rollout_backend="auto": the fast sampler


def test_kl_is_exactly_zero_at_the_first_step(qwen_dir):
    torch.manual_seed(0)
    m = _module(qwen_dir, beta=0.1)
    _fit(m, _rows(2), steps=1)
    assert m.last_rollout_metrics["kl"] == 0.0
    assert m.last_rollout_metrics["ratio_mean"] == 1.0


def test_kl_is_zero_at_first_step_from_a_warm_start_adapter(qwen_dir, tmp_path):
    # reliability #23: the reference must be the warm-start adapter, not the bare base (trl#3194)
    torch.manual_seed(0)
    sft = _module(qwen_dir)
    with torch.no_grad():
        for n, p in sft.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    sft.model.save_pretrained(tmp_path / "adapter")
    m = _module(qwen_dir, beta=0.1, adapter_path=str(tmp_path / "adapter"))
    warm = {n: p.detach().clone() for n, p in m.model.named_parameters() if "lora_B" in n and "default" in n}
    assert any(p.abs().sum() > 0 for p in warm.values())  # the warm start was loaded
    _fit(m, _rows(2), steps=1)
    assert m.last_rollout_metrics["kl"] == 0.0
    # the frozen reference copy is not trained and not in the checkpoint
    assert not any("grpo_reference" in k for k in m.state_dict())
    with pytest.raises(ValueError, match="does not match"):
        _module(qwen_dir, r=8, adapter_path=str(tmp_path / "adapter"))


def _mock_generate(module, completions):
    """Replace ``generate`` by one that appends fixed completions (N, C) to the prompts."""
    module.rollout_backend = "hf"  # the fast path has its own loop; these cases test the masks
    def fake_generate(input_ids=None, **kw):
        n = input_ids.shape[0]
        comp = torch.tensor(completions, dtype=torch.long)
        assert comp.shape[0] == n
        return torch.cat([input_ids, comp], dim=1)
    module.model.generate = fake_generate


def test_mocked_generate_eos_truncation_stop_strings_and_image_tokens(qwen_dir):
    m = _module(qwen_dir, num_generations=3, stop_strings=["</a>"])
    tok = m.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    img = tok.convert_tokens_to_ids("<|image_pad|>")
    a, b = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("2")
    stop = tok("x</a>yy", add_special_tokens=False)["input_ids"]
    width = max(6, len(stop))
    rows = [
        [a, b, eos, pad, pad, pad],  # EOS at 2: mask 3 tokens, not truncated
        [a, b, a, b, a, b],  # no EOS: truncated, mask all 6
        [eos, a, b, a, b, a],  # EOS first: one-token completion, garbage after it is masked
        stop + [a] * (6 - len(stop)),  # stop string: ends with its last token, not truncated
        [a, img, b, eos, pad, pad],  # vision placeholder: rejected, fully masked
        [a, b, eos, eos, eos, eos],  # repeated EOS (pad == eos filling): only the first counts
    ]
    rows = [r + [pad] * (width - len(r)) for r in rows]
    rows[1] = [a, b] * (width // 2) + [a] * (width % 2)  # no EOS (pad is an EOS id here) anywhere
    _mock_generate(m, rows)
    batch = VisionChatCollator(m.processor, for_generation=True)(_rows(2))
    tiled, comp = m.generate_completions(batch, 3)
    n_stop = next(k for k in range(1, len(stop) + 1) if "</a>" in tok.decode(stop[:k]))
    assert comp.completion_mask.sum(1).tolist() == [3, width, 1, n_stop, 0, 3]
    assert comp.truncated.tolist() == [False, True, False, False, False, False]
    assert comp.rejected.tolist() == [False, False, False, False, True, False]
    assert comp.texts[0] == "12" and comp.texts[2] == ""
    assert tiled["references"] == ["10", "11"] * 3  # tile order: row g * B + b is sample g of prompt b
    rewards, _ = m.score(tiled, comp)
    assert torch.isnan(rewards[4])  # a rejected completion is left out of the group statistics


def test_all_truncated_with_masking_gives_zero_loss_and_no_update(qwen_dir):
    torch.manual_seed(0)
    m = _module(qwen_dir, num_generations=2, mask_truncated_completions=True, beta=0.1)
    a = m.tokenizer.convert_tokens_to_ids("1")
    _mock_generate(m, [[a, a, a, a]] * 4)  # no EOS anywhere
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    _fit(m, _rows(2), steps=1)
    assert m.last_rollout_metrics["completions/truncated_frac"] == 1.0
    assert m.last_rollout_metrics["loss"] == 0.0
    for n, p in m.model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_micro_batches_accumulate_to_the_full_batch_gradient(qwen_dir):
    # dapo with the global token count: G tiles in one forward == one tile per forward, accumulated
    grads = []
    for per_micro in (None, 1):
        torch.manual_seed(0)
        m = _module(qwen_dir, num_generations=3, generations_per_micro_batch=per_micro)
        with torch.no_grad():
            for n, p in m.model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        tok = m.tokenizer
        a, eos = tok.convert_tokens_to_ids("1"), tok.convert_tokens_to_ids("<|im_end|>")
        _mock_generate(m, [[a, eos, eos], [a, a, eos], [eos, a, a], [a, a, a], [a, eos, a], [a, a, eos]])
        m.optimizers = lambda: _NoStep()
        m.lr_schedulers = lambda: None
        m._trainer = None
        m.manual_backward = lambda loss: loss.backward()
        m.log_dict = m.log = lambda *a, **k: None
        m.clip_gradients = lambda *a, **k: None
        m.training_step(VisionChatCollator(m.processor, for_generation=True)(_rows(2)), 0)
        grads.append({n: p.grad.clone() for n, p in m.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


class _NoStep:
    param_groups = [{"lr": 0.0}]

    def zero_grad(self):
        pass

    def step(self):
        pass


def test_refused_configurations(qwen_dir):
    with pytest.raises(ValueError, match="loss_type='grpo'"):
        VisionGRPOModule(str(qwen_dir), importance_sampling_level="sequence", loss_type="dapo")
    with pytest.raises(ValueError, match="at least 2"):
        VisionGRPOModule(str(qwen_dir), num_generations=1)
    with pytest.raises(ValueError, match="lora=False"):
        VisionGRPOModule(str(qwen_dir), beta=0.1, lora=False)
    with pytest.raises(ValueError, match="reward_weights"):
        VisionGRPOModule(str(qwen_dir), reward_funcs=[spread_reward], reward_weights=[1.0, 2.0])
    m = _module(qwen_dir)
    train_batch = VisionChatCollator(m.processor)(_rows(2))  # teacher-forced batch with labels
    with pytest.raises(ValueError, match="train_for_generation"):
        m.training_step(train_batch, 0)


def test_reward_errors_surface_with_the_row(qwen_dir):
    from vlm_lightning.rewards import RewardError

    def broken(prompts, completions, row_index, **kw):
        return [1.0 / (r - 1) for r in row_index]  # prompt 1 divides by zero: tiled row 1 is its first sample

    m = _module(qwen_dir, reward_funcs=[broken, CharF1Reward()])
    batch = VisionChatCollator(m.processor, for_generation=True)(_rows(2))
    tiled, comp = m.generate_completions(batch, 3)
    with pytest.raises(RewardError, match="'broken' raised ZeroDivisionError on row 1"):
        m.score(tiled, comp)


def _cli(config, *overrides):
    # the real entry point's CLI class (what `vlm-lightning fit` builds), not a bare LightningCLI
    from vlm_lightning.cli import cli_main

    args = ["--config", str(config), "--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.logger=false",
            *overrides]
    return cli_main(args, run=False)


# A random tiny Qwen2-VL fully fine-tuned by GRPO with a large learning rate (what recipes/demo/grpo_cpu.yaml was
# before the demo started from the SFT demo's trained model): character F1 + 1 - CER rise within 16 CPU steps as
# the policy learns to answer in digits.
RANDOM_MODEL_GRPO = """
seed_everything: 0
trainer: {accelerator: cpu, devices: 1, precision: 32, max_steps: 16, limit_val_batches: 0,
          enable_checkpointing: false}
model:
  class_path: vlm_lightning.modules.grpo.VisionGRPOModule
  init_args:
    model_name_or_path: tiny:qwen2_vl
    dtype: float32
    lora: false
    gradient_checkpointing: false
    reward_funcs:
      - class_path: vlm_lightning.rewards.CharF1Reward
      - class_path: vlm_lightning.rewards.OCRReward
    num_generations: 8
    max_new_tokens: 4
    loss_type: dapo
    epsilon_high: 0.28
    optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 1.0e-2, weight_decay: 0.0}}
data: {batch_size: 2, train_for_generation: true}
"""


def test_grpo_from_a_random_model_raises_the_reward_on_cpu(tmp_path, monkeypatch):
    from vlm_lightning.demo.data import make_demo_ocr_dataset

    monkeypatch.setenv("VLM_LIGHTNING_TINY_DIR", str(tmp_path / "tiny"))
    monkeypatch.chdir(tmp_path)
    paths = make_demo_ocr_dataset(tmp_path / "demo_ocr")
    config = tmp_path / "grpo_random.yaml"
    config.write_text(RANDOM_MODEL_GRPO)
    cli = _cli(config, f"--data.train={paths['train']}")
    rewards = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, module, *args):
            rewards.append(module.last_rollout_metrics["reward/mean"])

    cli.trainer.callbacks.append(Record())
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(rewards) == 16
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    print("demo rewards", [round(r, 3) for r in rewards])
    assert last > first + 0.1, rewards


def _logprob_paths_agree(module, device):
    from vlm_lightning.models.hf import model_inputs
    from vlm_lightning.rollout import completion_logprobs

    batch = VisionChatCollator(module.processor, for_generation=True)(_rows(2))
    tiled, comp = module.generate_completions({k: v.to(device) if torch.is_tensor(v) else v
                                               for k, v in batch.items()}, 2)
    inputs = {k: v.to(device) for k, v in model_inputs(tiled).items()}
    ids, mask = comp.completion_ids.to(device), comp.completion_mask.to(device)
    with torch.no_grad():
        plain = completion_logprobs(module.model, inputs, ids, mask, temperature=0.7, use_kernels=False)
        fused = completion_logprobs(module.model, inputs, ids, mask, temperature=0.7, use_kernels=True)
    m = mask.bool()
    return plain[m], fused[m]


def test_fused_token_logprobs_match_the_logits_path(qwen_dir):
    # use_kernels: decoder hidden states + fused_linear_token_logprobs == logits_to_keep + selective log-softmax
    torch.manual_seed(0)
    m = _module(qwen_dir, num_generations=2)
    plain, fused = _logprob_paths_agree(m, torch.device("cpu"))
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_grpo_step_bf16_with_kernels_on_gpu(qwen_dir):
    # on a CUDA machine: pytest -q -m cuda tests/modules/test_grpo.py
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch.manual_seed(0)
    m = _module(qwen_dir, dtype="bfloat16", use_kernels=True, beta=0.05, num_iterations=2)
    m.model.cuda()
    plain, fused = _logprob_paths_agree(m, torch.device("cuda"))
    torch.testing.assert_close(fused, plain, atol=5e-2, rtol=5e-2)
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    collator = VisionChatCollator(m.processor, for_generation=True)
    trainer = L.Trainer(max_steps=2, accelerator="gpu", devices=1, precision="bf16-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(m, torch.utils.data.DataLoader(_rows(2), batch_size=2, collate_fn=collator))
    assert m.last_rollout_metrics["kl"] == m.last_rollout_metrics["kl"]
    changed = [n for n, p in m.model.named_parameters() if not torch.equal(p.cpu(), before[n].cpu())]
    assert changed and all("lora_" in n for n in changed)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_next", "pixtral", "gemma3", "mistral3", "mllama"])
def test_rescored_logprobs_equal_the_sampling_logprobs(tiny_vlm_dir, family):
    # reliability #22: tiled prompts + completions re-scored in one forward (left padding, vision inputs,
    # token-type ids extended) give the log-probs generate sampled from, for every family
    from vlm_lightning.models.hf import model_inputs
    from vlm_lightning.rollout import completion_logprobs, tile_batch

    torch.manual_seed(0)
    m = _module(tiny_vlm_dir(family), num_generations=2)
    with torch.no_grad():
        for n, p in m.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # an active adapter: sampling and scoring both see it
    rows = _rows(2)
    if family.startswith("qwen"):  # a two-image row next to a one-image row
        rows[1]["messages"][0]["content"].insert(0, {"type": "image", "image": Image.new("RGB", (56, 84), "red")})
    tiled = tile_batch(VisionChatCollator(m.processor, for_generation=True)(rows), 2)
    inputs = model_inputs(tiled)
    m.model.eval()
    with torch.no_grad():
        out = m.model.generate(**inputs, do_sample=True, max_new_tokens=5, return_dict_in_generate=True,
                               output_logits=True, pad_token_id=m.tokenizer.pad_token_id)
    ids = out.sequences[:, inputs["input_ids"].shape[1]:]
    sampled = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    m.model.train()
    with torch.no_grad():
        rescored = completion_logprobs(m.model, inputs, ids, torch.ones_like(ids))
    torch.testing.assert_close(rescored, sampled, atol=1e-4, rtol=1e-4)


def test_mllama_grpo_step_falls_back_to_hf_generate(tiny_vlm_dir):
    """Llama 3.2 Vision: the fast engine has no cross-attention decode step, so rollout_backend="auto" samples with HF
    generate (which carries the cross_attention_mask forward); its tower has no get_image_features to cache, so the
    images are encoded per forward. Two steps move every LoRA weight (cross-attention q/k/v/o included), nothing
    else."""
    torch.manual_seed(0)
    m = _module(tiny_vlm_dir("mllama"))
    before = {n: p.detach().clone() for n, p in m.model.named_parameters()}
    _fit(m, _rows(2), steps=2)
    assert m.last_rollout_stats["backend"] == "hf_generate"
    changed = {n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed == lora and any(".cross_attn.q_proj.lora_" in n for n in lora)
    assert all(v == v for v in m.last_rollout_metrics.values())  # finite loss / KL / rewards


def test_validation_rewards_and_sample_logging_to_tensorboard(qwen_dir, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    torch.manual_seed(0)
    m = _module(qwen_dir, num_generations=2, log_completions=2, log_completions_every_n_steps=1,
                reward_funcs=[spread_reward, CharF1Reward()])
    collator = VisionChatCollator(m.processor, for_generation=True)
    loader = torch.utils.data.DataLoader(_rows(2), batch_size=2, collate_fn=collator)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=TensorBoardLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(m, loader, loader)
    logged = trainer.callback_metrics
    for key in ("val/reward", "val/reward/char_f1", "train/reward", "train/reward/char_f1/mean", "train/kl"
                if m.hparams.beta else "train/loss", "train/completions/truncated_frac"):
        assert key in logged, (key, sorted(logged))
    events = list(tmp_path.rglob("events.out.tfevents*"))
    assert events and max(e.stat().st_size for e in events) > 1000  # scalars + the samples table and images
