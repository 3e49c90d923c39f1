"""Scoring text against references: one normaliser and the OCR / VQA / DocVQA metrics built on it."""
from .text import TextNormalizer, anls, cer, levenshtein, score_predictions, vqa_accuracy

__all__ = ["TextNormalizer", "anls", "cer", "levenshtein", "score_predictions", "vqa_accuracy"]
