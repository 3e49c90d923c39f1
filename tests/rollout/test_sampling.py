"""The fast engine's logit warping (vlm_lightning.rollout.sampling) equals transformers' own processors."""
from __future__ import annotations

import torch

from vlm_lightning.rollout.sampling import warp_logits


def test_warpers_equal_hf_processors():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    logits = torch.randn(5, 97) * 3
    ids = torch.zeros(5, 1, dtype=torch.long)
    for temp, k, p in [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (0.5, 3, 1.0)]:
        procs = LogitsProcessorList([SuppressTokensLogitsProcessor([4, 7]), TemperatureLogitsWarper(temp)])
        if k:
            procs.append(TopKLogitsWarper(k))
        if p < 1:
            procs.append(TopPLogitsWarper(p))
        ref = procs(ids, logits.clone())
        ours = warp_logits(logits, temp, k, p, torch.tensor([4, 7]))
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (temp, k, p)
        torch.testing.assert_close(ours.softmax(-1), ref.softmax(-1))


