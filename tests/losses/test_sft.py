"""masked_token_loss: the shifted, masked next-token cross-entropy with the accumulation-exact normaliser."""
import torch
import torch.nn.functional as F

from vlm_lightning.losses import masked_token_loss


def test_masked_token_loss_matches_cross_entropy_and_accumulates_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(masked_token_loss(logits, labels), ref)
    # two micro-batches with the global labelled count sum to the full-batch mean
    n = int((labels[:, 1:] != -100).sum())
    acc = masked_token_loss(logits[:1], labels[:1], n) + masked_token_loss(logits[1:], labels[1:], n)
    torch.testing.assert_close(acc, ref)
    lp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(masked_token_loss(lp, labels, is_logprobs=True), ref)
    # nothing labelled -> 0, finite gradient
    empty = masked_token_loss(logits, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()
