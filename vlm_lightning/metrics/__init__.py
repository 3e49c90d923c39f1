"""Scoring text against references: one normaliser and the OCR / VQA metrics built on it."""
from .text import TextNormalizer, cer, score_predictions, vqa_accuracy

__all__ = ["TextNormalizer", "cer", "score_predictions", "vqa_accuracy"]
