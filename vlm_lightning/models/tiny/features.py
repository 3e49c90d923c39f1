"""Count the image features a VLM's vision tower produces, per image, for a processed batch."""

from __future__ import annotations

import torch

# Processor outputs that `get_image_features` of some family takes besides pixel_values.
_IMAGE_KWARGS = ("image_grid_thw", "image_sizes")


@torch.no_grad()
def image_feature_counts(model, batch: dict) -> list[int]:
    """Number of projected image features per image (in batch order) for `batch` from the processor.

    The processor must have put exactly this many image placeholder tokens into `input_ids`; the
    forward raises (or silently misplaces features) otherwise. Llama 3.2 Vision's tile features reach the text
    through cross-attention, so each image it encodes counts one (its one ``<|image|>`` token).

    Example:
        >>> inputs = processor(text=[prompt], images=[[img]], return_tensors="pt")
        >>> image_feature_counts(model, inputs)
        [4]
    """
    if "aspect_ratio_ids" in batch:  # Llama 3.2 Vision: one <|image|> per image encoded (id 0 = a padding image)
        return [1] * int((batch["aspect_ratio_ids"] != 0).sum())
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "get_image_features") else model
    # Pass what the processor produced: transformers 5.17's LLaVA takes image_sizes only through **kwargs.
    kwargs = {k: batch[k] for k in _IMAGE_KWARGS if k in batch}
    out = inner.get_image_features(pixel_values=batch["pixel_values"], return_dict=True, **kwargs)
    feats = out.pooler_output if hasattr(out, "pooler_output") and out.pooler_output is not None else out
    if isinstance(feats, (list, tuple)):  # one (tokens, dim) tensor per image
        return [int(f.reshape(-1, f.shape[-1]).shape[0]) for f in feats]
    if feats.dim() == 3:  # (images, tokens, dim)
        return [int(feats.shape[1])] * int(feats.shape[0])
    return [int(feats.shape[0])]  # (tokens, dim): a single image
