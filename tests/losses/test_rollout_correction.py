"""Rollout correction (TIS / MIS) and exact micro-batch normalisation, with values worked out by hand.

Shared example: three tokens, trainer (old) log-probs [-1.0, -2.0, -0.5], the engine's [-1.0, -2.5, -2.0]
-> log rho = [0, 0.5, 1.5] -> rho = [1, e^0.5 = 1.64872, e^1.5 = 4.48169].
"""
from __future__ import annotations

import math

import pytest
import torch

from vlm_lightning.losses.grpo import GRPOLossConfig, aggregate_loss, clipped_policy_loss
from vlm_lightning.losses.rollout_correction import rollout_correction_weights, rollout_mismatch_metrics

T = torch.tensor
E05, E15 = math.exp(0.5), math.exp(1.5)


def _example():
    return T([[-1.0, -2.0, -0.5]]), T([[-1.0, -2.5, -2.0]]), T([[1, 1, 1]])


def test_tis_truncates_and_mis_masks_at_the_cap():
    trainer, rollout, mask = _example()
    # TIS, cap 2: min(rho, 2) = [1, 1.64872, 2]
    torch.testing.assert_close(rollout_correction_weights(trainer, rollout, mask, "tis", 2.0), T([[1.0, E05, 2.0]]))
    # MIS, cap 2: rho where rho <= 2, else 0 = [1, 1.64872, 0]
    torch.testing.assert_close(rollout_correction_weights(trainer, rollout, mask, "mis", 2.0), T([[1.0, E05, 0.0]]))
    # outside the mask the weight is 0
    w = rollout_correction_weights(trainer, rollout, T([[1, 1, 0]]), "tis", 2.0)
    torch.testing.assert_close(w, T([[1.0, E05, 0.0]]))


def test_weights_carry_no_gradient():
    trainer, rollout, mask = _example()
    trainer.requires_grad_(True)
    assert not rollout_correction_weights(trainer, rollout, mask, "tis").requires_grad


def test_mismatch_metrics_by_hand():
    trainer, rollout, mask = _example()
    m = rollout_mismatch_metrics(trainer, rollout, mask, "tis", 2.0)
    # k3 = rho - 1 - log rho: [0, 1.64872 - 1.5 = 0.14872, 4.48169 - 2.5 = 1.98169] -> mean 0.71014
    kl = (0.0 + (E05 - 1.5) + (E15 - 2.5)) / 3
    assert m["rollout_correction/kl"].item() == pytest.approx(kl, rel=1e-5)
    assert m["rollout_correction/ratio_mean"].item() == pytest.approx((1 + E05 + E15) / 3, rel=1e-5)
    assert m["rollout_correction/ratio_min"].item() == pytest.approx(1.0)
    assert m["rollout_correction/ratio_max"].item() == pytest.approx(E15, rel=1e-5)
    assert m["rollout_correction/clipped_frac"].item() == pytest.approx(1 / 3)  # one of 3 tokens above 2
    mis = rollout_mismatch_metrics(trainer, rollout, mask, "mis", 5.0)
    assert mis["rollout_correction/masked_frac"].item() == 0.0  # 4.48 <= 5
    # masked-out tokens are not counted: only token 0 (rho 1) is active -> KL 0, ratio 1
    one = rollout_mismatch_metrics(trainer, rollout, T([[1, 0, 0]]))
    assert one["rollout_correction/kl"].item() == 0.0 and one["rollout_correction/ratio_max"].item() == 1.0
    assert "rollout_correction/clipped_frac" not in one  # mode None: only the diagnostics
    empty = rollout_mismatch_metrics(trainer, rollout, T([[0, 0, 0]]))
    assert math.isnan(empty["rollout_correction/kl"].item())


def test_token_weights_multiply_the_policy_term_only():
    # num_iterations 1 (old = logp.detach(): coef 1), A = 1, dapo over 3 active tokens:
    # loss = -(w0 + w1 + w2) / 3 = -(1 + 1.64872 + 2) / 3; d loss / d logp_t = -w_t / 3 (d coef / d logp = coef = 1)
    trainer, rollout, mask = _example()
    logp = trainer.clone().requires_grad_(True)
    w = rollout_correction_weights(trainer, rollout, mask, "tis", 2.0)
    cfg = GRPOLossConfig(num_generations=2, loss_type="dapo")
    loss, _ = clipped_policy_loss(logp, None, T([1.0]), mask, cfg, token_weights=w)
    assert loss.item() == pytest.approx(-(1 + E05 + 2) / 3, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, T([[-1.0, -E05, -2.0]]) / 3)
    # the KL term is not reweighted: beta 0.5, ref = logp + 1 on token 2 only -> k3 = e - 2 = 0.71828 there;
    # MIS weights [1, 1.64872, 0] -> loss = (-(1 + 1.64872 + 0) + 0.5 * 0.71828) / 3
    cfg = GRPOLossConfig(num_generations=2, loss_type="dapo", beta=0.5)
    w = rollout_correction_weights(trainer, rollout, mask, "mis", 2.0)
    ref = trainer + T([[0.0, 0.0, 1.0]])
    loss, _ = clipped_policy_loss(trainer.clone(), None, T([1.0]), mask, cfg, ref_logp=ref, token_weights=w)
    assert loss.item() == pytest.approx((-(1 + E05) + 0.5 * (math.e - 2)) / 3, rel=1e-6)


def test_bad_modes_and_caps_raise():
    trainer, rollout, mask = _example()
    with pytest.raises(ValueError, match="rollout_correction"):
        rollout_correction_weights(trainer, rollout, mask, "sequence")
    with pytest.raises(ValueError, match="cap"):
        rollout_correction_weights(trainer, rollout, mask, "tis", 0.0)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        rollout_correction_weights(trainer, rollout[:, :2], mask, "tis")


def test_step_counts_make_uneven_micro_batches_exact_by_hand():
    # rows: [2, 4, 0] (2 active) and [6, 0, 0] (1 active), split 1 + 1 (B * A = 2 rows, as before) and as
    # one batch of 2: grpo = (3 + 6) / 2 = 4.5; bnpo = 12 / 3 = 4; dr_grpo (L = 3) = 12 / (2 * 3) = 2
    per_tok = T([[2.0, 4.0, 0.0], [6.0, 0.0, 0.0]])
    m = T([[1, 1, 0], [1, 0, 0]])
    for loss_type, whole in (("grpo", 4.5), ("bnpo", 4.0), ("dr_grpo", 2.0)):
        parts = sum(aggregate_loss(per_tok[i:i + 1], m[i:i + 1], loss_type, max_completion_length=3,
                                   batch_rows=2, batch_tokens=3) for i in range(2))
        assert parts.item() == pytest.approx(whole), loss_type
    # bnpo without the step's token count is TRL's per-micro-batch mean: (6/2 + 6/1) / 2 = 4.5, not 4
    parts = sum(aggregate_loss(per_tok[i:i + 1], m[i:i + 1], "bnpo", grad_accum_steps=2) for i in range(2))
    assert parts.item() == pytest.approx(4.5)


@pytest.mark.parametrize("loss_type,level", [("dapo", "token"), ("bnpo", "token"), ("grpo", "token"),
                                             ("dr_grpo", "token"), ("grpo", "sequence")])
def test_uneven_micro_batches_give_the_one_batch_loss_and_gradient(loss_type, level):
    torch.manual_seed(0)
    n, c = 7, 5
    logp0 = -torch.rand(n, c) * 2
    old = logp0 + 0.1 * torch.randn(n, c)
    ref = logp0 + 0.1 * torch.randn(n, c)
    rollout = old + 0.2 * torch.randn(n, c)
    adv = torch.randn(n)
    mask = (torch.arange(c)[None] < torch.randint(0, c + 1, (n, 1))).long()  # uneven lengths, one may be empty
    cfg = GRPOLossConfig(num_generations=2, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                         max_completion_length=c)
    w = rollout_correction_weights(old, rollout, mask, "tis", 1.5)
    totals = dict(num_items_in_batch=mask.sum(), batch_rows=n, batch_tokens=mask.sum())

    whole = logp0.clone().requires_grad_(True)
    loss, _ = clipped_policy_loss(whole, old, adv, mask, cfg, ref_logp=ref, token_weights=w, **totals)
    loss.backward()

    split = logp0.clone().requires_grad_(True)
    acc = 0.0
    for s in (slice(0, 3), slice(3, 4), slice(4, 7)):  # 3 + 1 + 3 rows
        part, _ = clipped_policy_loss(split[s], old[s], adv[s], mask[s], cfg, ref_logp=ref[s], token_weights=w[s],
                                      **totals)
        part.backward()
        acc = acc + part.detach()
    torch.testing.assert_close(acc, loss.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(split.grad, whole.grad, atol=1e-7, rtol=1e-6)
