"""Token log-probs (vlm_lightning.rollout.logprobs): the selective log-softmax equals log_softmax + gather.
(Re-scored completions against ``generate``'s own log-probs, per family: tests/modules/test_grpo.py.)"""
from __future__ import annotations

import torch

from vlm_lightning.rollout.logprobs import selective_log_softmax


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


def test_selective_log_softmax_matches_log_softmax_gather():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 17)
    idx = torch.randint(0, 17, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    close(selective_log_softmax(logits, idx), ref)
    close(selective_log_softmax(logits[0], idx[0]), ref[0])
    bf = selective_log_softmax(logits.bfloat16(), idx)
    assert bf.dtype == torch.float32
