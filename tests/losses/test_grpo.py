"""GRPO-family loss math against values worked out by hand (in the comments), plus the edge cases:
zero-variance/NaN advantages, truncated completions masked out, log-ratio overflow."""
import math

import pytest
import torch

from vlm_lightning.losses import (
    GRPOLossConfig,
    aggregate_loss,
    clipped_policy_loss,
    group_advantages,
    importance_log_weights,
    k3_kl,
    mask_truncated_completions,
)

T = torch.tensor


def ratio(logp, old_logp, mask, level="token"):
    """The importance ratio w = exp(log w)."""
    return torch.exp(importance_log_weights(logp, old_logp, mask, level))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


# --------------------------------------------------------------------------------------------- advantages
def test_group_advantages_hand_worked():
    # group 1 = [1, 0, 0, 1]: mean 0.5, unbiased std sqrt((4 * 0.25) / 3) = sqrt(1/3) = 0.5773503
    #   -> +-0.5 / (0.5773503 + 1e-4) = +-0.865875
    # group 2 = [0, 0, 0, 0]: all equal -> exactly 0
    adv = group_advantages(T([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]), num_generations=4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(adv, [a, -a, -a, a, 0, 0, 0, 0])
    assert adv.dtype == torch.float32


def test_group_advantages_batch_and_none_scaling():
    # rewards [1, 0 | 3, 3], G=2: group means 0.5 and 3 -> centred [0.5, -0.5, 0, 0]
    # batch std: mean 1.75, squared deviations .5625 + 3.0625 + 1.5625 + 1.5625 = 6.75, / 3 = 2.25 -> 1.5
    r = T([1.0, 0.0, 3.0, 3.0])
    close(group_advantages(r, 2, "none"), [0.5, -0.5, 0.0, 0.0])
    b = 0.5 / (1.5 + 1e-4)
    close(group_advantages(r, 2, "batch"), [b, -b, 0.0, 0.0])
    # group scaling of [1, 0]: std sqrt(0.5) = 0.7071068 -> 0.5 / 0.7072068 = 0.707007
    g = 0.5 / (math.sqrt(0.5) + 1e-4)
    close(group_advantages(r, 2, "group"), [g, -g, 0.0, 0.0])


def test_all_equal_rewards_give_exact_zero_even_in_fp32():
    # 0.35 is not representable: an fp32 mean leaves a ~1e-8 residue that 1/(std+1e-4) would inflate
    # (NeMo-RL PR#4161). All-equal groups must give exactly 0.
    adv = group_advantages(torch.full((8,), 0.35), 8)
    assert torch.equal(adv, torch.zeros(8))


def test_seven_vs_one_split():
    # [0.35]*7 + [0]: mean 2.45/8 = 0.30625; deviations 0.04375 (x7) and -0.30625
    # unbiased var = (7 * 0.04375^2 + 0.30625^2) / 7 = 0.1071875 / 7 = 0.0153125 -> std 0.1237437
    adv = group_advantages(T([0.35] * 7 + [0.0]), 8)
    std = math.sqrt(0.0153125)
    close(adv, [0.04375 / (std + 1e-4)] * 7 + [-0.30625 / (std + 1e-4)], tol=1e-4)
    assert torch.isfinite(adv).all()


def test_group_of_one_refused():
    with pytest.raises(ValueError, match="group of one"):
        group_advantages(T([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="at least 2"):
        GRPOLossConfig(num_generations=1)


def test_nan_rewards_are_left_out_and_get_zero_advantage():
    # group [1, NaN, 0, 1]: valid [1, 0, 1], mean 2/3; deviations 1/3, -2/3, 1/3
    # unbiased var = (1/9 + 4/9 + 1/9) / 2 = 1/3 -> std 0.5773503
    # group [NaN, NaN, NaN, NaN] -> all 0; group [NaN, 2, NaN, NaN] (one valid) -> all 0
    nan = float("nan")
    r = T([1.0, nan, 0.0, 1.0, nan, nan, nan, nan, nan, 2.0, nan, nan])
    adv = group_advantages(r, 4)
    s = math.sqrt(1 / 3) + 1e-4
    close(adv, [(1 / 3) / s, 0.0, (-2 / 3) / s, (1 / 3) / s] + [0.0] * 8)
    assert torch.isfinite(adv).all()
    for scale in ("batch", "none"):
        assert torch.isfinite(group_advantages(r, 4, scale)).all()
    assert torch.equal(group_advantages(torch.full((4,), nan), 2, "batch"), torch.zeros(4))


def test_bad_reward_shapes():
    with pytest.raises(ValueError, match="multiple of num_generations"):
        group_advantages(T([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="inf"):
        group_advantages(T([1.0, float("inf")]), 2)


# --------------------------------------------------------------------------------------------- masks
def test_all_truncated_gives_zero_loss_and_zero_grad():
    cfg = GRPOLossConfig(num_generations=2, loss_type="dapo", beta=0.1)
    logp = torch.randn(2, 3, requires_grad=True)
    mask = mask_truncated_completions(torch.ones(2, 3, dtype=torch.long), T([True, True]))  # no EOS: truncated
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        cfg = GRPOLossConfig(num_generations=2, loss_type=lt, beta=0.1)
        loss, metrics = clipped_policy_loss(logp, logp.detach() - 0.3, T([1.0, -1.0]), mask, cfg,
                                            ref_logp=logp.detach() + 0.5)
        (g,) = torch.autograd.grad(loss, logp)
        assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g)), lt
        assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------- ratios
def test_token_vs_sequence_ratio():
    # logp - old = [0.5, -0.5] -> token ratios e^0.5 = 1.648721, e^-0.5 = 0.606531; sequence: mean 0 -> 1
    logp, old, mask = T([[-1.0, -2.0]]), T([[-1.5, -1.5]]), T([[1, 1]])
    close(ratio(logp, old, mask, "token"), [[math.exp(0.5), math.exp(-0.5)]])
    close(ratio(logp, old, mask, "sequence"), [[1.0]])
    # padding is excluded from the sequence mean: a pad token with log-ratio -9 changes nothing
    close(ratio(T([[-1.0, -2.0, -9.0]]), T([[-1.5, -1.5, 0.0]]), T([[1, 1, 0]]), "sequence"), [[1.0]])
    # geometric mean: log-ratios [0.2, 0.4] -> s = exp(0.3) = 1.349859 = sqrt(e^0.2 * e^0.4)
    close(ratio(T([[0.2, 0.4]]), T([[0.0, 0.0]]), mask, "sequence"), [[math.sqrt(math.exp(0.2) * math.exp(0.4))]])
    assert importance_log_weights(logp, old, mask, "sequence").shape == (1, 1)
    assert importance_log_weights(logp, old, mask, "sequence_token").shape == (1, 2)


def test_sequence_ratio_gradient_is_s_over_length_on_active_tokens():
    # GSPO eq. 10: d s_i / d logp_t = s_i / |y_i| on the active tokens, 0 on padding.
    # log-ratios [0.2, 0.4, (pad)] -> s = e^0.3 = 1.349859, |y| = 2 -> grad 0.674929 on each active token
    logp = T([[0.2, 0.4, 3.0]], requires_grad=True)
    s = ratio(logp, T([[0.0, 0.0, 0.0]]), T([[1, 1, 0]]), "sequence")
    (g,) = torch.autograd.grad(s.sum(), logp)
    close(g, [[math.exp(0.3) / 2, math.exp(0.3) / 2, 0.0]])


def test_gspo_token_equals_gspo_with_sequence_advantages():
    # GSPO-token with A_{i,t} = A_i has the value and gradient of GSPO (paper, eq. 13-14)
    torch.manual_seed(1)
    old = torch.randn(3, 4)
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = T([1.0, -0.5, 2.0])
    out = {}
    for level in ("sequence", "sequence_token"):
        logp = (old + 0.01 * torch.randn(3, 4, generator=torch.Generator().manual_seed(2))).requires_grad_()
        cfg = GRPOLossConfig(num_generations=3, loss_type="grpo", importance_sampling_level=level,
                             epsilon=3e-4, epsilon_high=4e-4)
        loss, _ = clipped_policy_loss(logp, old, adv, mask, cfg)
        out[level] = (loss, torch.autograd.grad(loss, logp)[0])
    close(out["sequence"][0], out["sequence_token"][0])
    close(out["sequence"][1], out["sequence_token"][1])


def test_gspo_does_not_clip_tokens_when_the_sequence_ratio_is_one():
    # token log-ratios +-0.5 are far outside a 3e-4 band, but the sequence ratio is exactly 1: no clipping,
    # loss = -A = -2, and each of the 2 tokens gets gradient -A * s / |y| = -1
    cfg = GRPOLossConfig(num_generations=2, loss_type="grpo", importance_sampling_level="sequence",
                         epsilon=3e-4, epsilon_high=4e-4)
    logp = T([[-1.0, -2.0]], requires_grad=True)
    loss, m = clipped_policy_loss(logp, T([[-1.5, -1.5]]), T([2.0]), T([[1, 1]]), cfg)
    (g,) = torch.autograd.grad(loss, logp)
    close(loss, -2.0)
    close(g, [[-1.0, -1.0]])
    assert m["clip_ratio/region_mean"].item() == 0.0


# --------------------------------------------------------------------------------------------- clipping
def _logp_for_ratios(ratios):
    old = torch.zeros(1, len(ratios))
    return T([[math.log(r) for r in ratios]], requires_grad=True), old


def test_asymmetric_clipping_hand_worked():
    # eps = 0.2, eps_high = 0.28, token ratios [1.5, 0.5, 1.0], one row, "grpo" -> mean over 3 tokens
    cfg = GRPOLossConfig(num_generations=2, loss_type="grpo", epsilon=0.2, epsilon_high=0.28)
    mask = T([[1, 1, 1]])
    # A = +1: -min(r, clip(r)) = [-min(1.5, 1.28), -min(0.5, 0.8), -1] = [-1.28, -0.5, -1] -> mean -0.926667
    #   grad wrt logp_t of -r_t A / 3 where unclipped: [0 (clipped high), -0.5/3, -1/3]
    logp, old = _logp_for_ratios([1.5, 0.5, 1.0])
    loss, m = clipped_policy_loss(logp, old, T([1.0]), mask, cfg)
    close(loss, (-1.28 - 0.5 - 1.0) / 3)
    close(torch.autograd.grad(loss, logp)[0], [[0.0, -0.5 / 3, -1.0 / 3]])
    close(m["clip_ratio/high_mean"], 1 / 3)
    close(m["clip_ratio/low_mean"], 0.0)
    close(m["clip_ratio/region_mean"], 1 / 3)
    close(m["ratio_mean"], 1.0)
    # A = -1: -min(-r, -clip(r)) = [max(1.5, 1.28), max(0.5, 0.8), 1] = [1.5, 0.8, 1] -> mean 1.1
    #   grads: [1.5/3 (unclipped, pessimistic side), 0 (clipped low), 1/3]
    logp, old = _logp_for_ratios([1.5, 0.5, 1.0])
    loss, m = clipped_policy_loss(logp, old, T([-1.0]), mask, cfg)
    close(loss, (1.5 + 0.8 + 1.0) / 3)
    close(torch.autograd.grad(loss, logp)[0], [[1.5 / 3, 0.0, 1.0 / 3]])
    close(m["clip_ratio/low_mean"], 1 / 3)
    close(m["clip_ratio/high_mean"], 0.0)


def test_delta_caps_the_negative_advantage_ratio():
    # A = -1, ratio 5, eps 0.2: without delta the loss is max(5, 1.2) = 5 with gradient 5 (= r * |A|);
    # delta = 2 caps it at 2 with zero gradient (INTELLECT-2 two-sided clipping)
    mask = T([[1]])
    logp, old = _logp_for_ratios([5.0])
    loss, _ = clipped_policy_loss(logp, old, T([-1.0]), mask, GRPOLossConfig(num_generations=2, loss_type="grpo"))
    close(loss, 5.0, tol=1e-4)
    close(torch.autograd.grad(loss, logp)[0], [[5.0]], tol=1e-4)
    logp, old = _logp_for_ratios([5.0])
    cfg = GRPOLossConfig(num_generations=2, loss_type="grpo", delta=2.0)
    loss, _ = clipped_policy_loss(logp, old, T([-1.0]), mask, cfg)
    close(loss, 2.0)
    close(torch.autograd.grad(loss, logp)[0], [[0.0]])


# --------------------------------------------------------------------------------------------- KL
def test_k3_kl_hand_worked():
    # d = ref - logp: d = -1 -> e^-1 + 1 - 1 = 0.367879; d = +1 -> e - 1 - 1 = 0.718282; d = 0 -> 0 exactly
    kl = k3_kl(T([[-1.0, -2.0, -3.0]]), T([[-2.0, -1.0, -3.0]]))
    close(kl, [[math.exp(-1), math.e - 2, 0.0]])
    assert kl[0, 2].item() == 0.0


def test_kl_term_added_with_beta_and_zero_when_policy_equals_reference():
    # one token, ratio 1, A = 0 -> policy term 0; beta 0.5, d = ref - logp = 1 -> 0.5 * (e - 2) = 0.359141
    cfg = GRPOLossConfig(num_generations=2, loss_type="bnpo", beta=0.5)
    logp = T([[-2.0]], requires_grad=True)
    loss, m = clipped_policy_loss(logp, None, T([0.0]), T([[1]]), cfg, ref_logp=T([[-1.0]]))
    close(loss, 0.5 * (math.e - 2))
    close(m["kl"], math.e - 2)
    # policy == reference -> KL exactly 0
    lp = torch.randn(2, 3)
    _, m = clipped_policy_loss(lp.clone().requires_grad_(), None, T([1.0, -1.0]), torch.ones(2, 3), cfg, ref_logp=lp)
    assert m["kl"].item() == 0.0
    with pytest.raises(ValueError, match="ref_logp"):
        clipped_policy_loss(lp, None, T([1.0, -1.0]), torch.ones(2, 3), cfg)


def test_k3_kl_is_exact_below_the_reference_and_clamped_only_where_exp_overflows():
    # issue 17 item 8: d = ref - logp = -50 cannot overflow -> k3 = e^-50 + 50 - 1 = 49 (not the clamped 19), and
    # d(beta * mean k3)/d logp = beta * (1 - e^d) / 6 = 0.04 / 6 = 0.0066667 per token (bnpo over 6 tokens), not 0
    cfg = GRPOLossConfig(num_generations=2, loss_type="bnpo", beta=0.04)
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    loss, m = clipped_policy_loss(logp, logp, torch.zeros(2), mask, cfg, ref_logp=(logp - 50).detach())
    close(m["kl"], 49.0)
    close(torch.autograd.grad(loss, logp)[0], torch.full((2, 3), 0.04 / 6))
    # d = +50 would overflow e^d in bf16/fp16 and blow up the loss: still clamped at log_ratio_clip = 20
    big = k3_kl(torch.zeros(1, 1), T([[50.0]]))
    close(big, [[math.exp(20) - 21]], tol=1e3)
    assert torch.isfinite(big).all()


# --------------------------------------------------------------------------------------------- aggregation
def test_aggregations_hand_worked():
    # per_tok = [[1, 2, 3, x], [4, x, x, x]], mask [[1, 1, 1, 0], [1, 0, 0, 0]] (x = masked, set to 100)
    per_tok = T([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    m = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    close(aggregate_loss(per_tok, m, "grpo"), 3.0)  # row means 6/3 = 2 and 4/1 = 4 -> 3
    close(aggregate_loss(per_tok, m, "grpo", grad_accum_steps=2), 1.5)
    close(aggregate_loss(per_tok, m, "bnpo"), 2.5)  # 10 / 4 active tokens
    close(aggregate_loss(per_tok, m, "dr_grpo", max_completion_length=5), 1.0)  # 10 / (2 * 5)
    close(aggregate_loss(per_tok, m, "dr_grpo"), 1.25)  # 10 / (2 * T=4)
    close(aggregate_loss(per_tok, m, "dapo", num_items_in_batch=8), 1.25)  # 10 / 8 global tokens
    close(aggregate_loss(per_tok, m, "dapo", num_items_in_batch=8, world_size=2), 2.5)  # 10 / (8 / 2)
    close(aggregate_loss(per_tok, m, "dapo"), 2.5)  # local count 4
    # a (B, 1) per-sequence loss under "grpo" is just its mean over rows: (7 + 9) / 2
    close(aggregate_loss(T([[7.0], [9.0]]), m, "grpo"), 8.0)


def test_dapo_accumulation_matches_the_full_batch():
    # two micro-batches with the global token count sum to the full-batch DAPO loss (and gradients)
    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    old = logp.detach() + 0.1 * torch.randn(4, 5)
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    adv = T([1.0, -1.0, 0.5, -0.5])
    cfg = GRPOLossConfig(num_generations=2, loss_type="dapo", epsilon_high=0.28)
    full, _ = clipped_policy_loss(logp, old, adv, mask, cfg)
    g_full = torch.autograd.grad(full, logp)[0]
    n = int(mask.sum())
    parts = [clipped_policy_loss(logp[s], old[s], adv[s], mask[s], cfg, num_items_in_batch=n, grad_accum_steps=2)[0]
             for s in (slice(0, 2), slice(2, 4))]
    acc = parts[0] + parts[1]
    close(acc, full)
    close(torch.autograd.grad(acc, logp)[0], g_full)


def test_fully_masked_row_counts_as_zero_and_has_zero_grad():
    # grpo: rows [1.5, 0 (masked)] -> mean 0.75; the masked row's logp get no gradient in any aggregation
    close(aggregate_loss(T([[1.0, 2.0], [5.0, 5.0]]), T([[1, 1], [0, 0]]), "grpo"), 0.75)
    logp = torch.randn(2, 3, requires_grad=True)
    mask = T([[1, 1, 0], [0, 0, 0]])
    for lt in ("grpo", "bnpo", "dr_grpo", "dapo"):
        loss, metrics = clipped_policy_loss(logp, logp.detach() + 0.2, T([1.0, -1.0]), mask,
                                            GRPOLossConfig(num_generations=2, loss_type=lt))
        g = torch.autograd.grad(loss, logp)[0]
        assert torch.isfinite(loss) and torch.equal(g[1], torch.zeros(3)) and torch.equal(g[0, 2:], torch.zeros(1))
        assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------- overflow
@pytest.mark.parametrize("level,loss_type", [("token", "dapo"), ("token", "grpo"), ("sequence", "grpo"),
                                             ("sequence_token", "grpo")])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_ratios_of_50_give_finite_loss_and_grads(level, loss_type, sign, dtype):
    # exp(50) = 5e21 overflows bf16 sums and exp(100) overflows fp32; the clamp at |log w| <= 20 keeps
    # everything finite (OpenRLHF PR#1293 / verl PR#2775 had the clamp computed but unused)
    cfg = GRPOLossConfig(num_generations=2, loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    old = torch.full((2, 4), -3.0, dtype=dtype)
    logp = (old.float() + sign * 50.0).to(dtype).requires_grad_()
    ref = (old.float() - sign * 50.0).to(dtype)
    loss, metrics = clipped_policy_loss(logp, old, T([1.0, -1.0]), torch.ones(2, 4), cfg, ref_logp=ref)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.isfinite(loss), loss
    assert torch.isfinite(g).all()
    assert all(torch.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,match", [
    (dict(importance_sampling_level="sequence", loss_type="dapo"), "length"),
    (dict(importance_sampling_level="sequence", loss_type="dr_grpo"), "loss_type='grpo'"),
    (dict(importance_sampling_level="sequence", loss_type="bnpo"), "GSPO"),
    (dict(importance_sampling_level="sequence_token", loss_type="dapo"), "GSPO"),
    (dict(epsilon=0.2, epsilon_high=0.1), "epsilon_high"),
    (dict(num_generations=1), "at least 2"),
    (dict(delta=1.1, epsilon_high=0.28), "delta"),
    (dict(beta=-0.1), "beta"),
    (dict(loss_type="ppo"), "loss_type"),
    (dict(scale_rewards="std"), "scale_rewards"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(epsilon=1.0), "epsilon"),
    (dict(max_completion_length=0), "max_completion_length"),
])
def test_refused_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOLossConfig(**kwargs)


def test_accepted_configs():
    assert GRPOLossConfig().epsilon_high == 0.2  # defaults to epsilon, as in TRL
    GRPOLossConfig(importance_sampling_level="sequence", loss_type="grpo", epsilon=3e-4, epsilon_high=4e-4)
    GRPOLossConfig(loss_type="dr_grpo", scale_rewards="none", max_completion_length=256)
    GRPOLossConfig(loss_type="dapo", epsilon_high=0.28, delta=4.0, beta=0.04)
