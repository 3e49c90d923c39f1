"""Generation for RL: G completions per prompt from a (LoRA) VLM, masked once, and their token log-probs.

``engine.generate`` is what ``VisionGRPOModule`` calls: a collated prompt batch in, one ``types.Rollout`` out
(fast decode engine, or HF ``generate`` where the engine does not apply). The rest: ``batch`` (tiling,
prompt + completion inputs, EOS / placeholder ids), ``masks`` (where a completion ends), ``hf`` (the one
``generate`` path), ``decode`` / ``sampling`` / ``lora`` (the fast engine's pieces), ``logprobs``.

Example:
    >>> out = generate(model, prompt_batch, num_generations=8, tokenizer=tok, max_new_tokens=256)
    >>> logp = completion_logprobs(model, model_inputs(tile_batch(prompt_batch, 8)), out.completion_ids,
    ...                            out.completion_mask)                                 # (B*8, C)
"""
from .batch import extend_inputs, tile_batch
from .engine import fast_generate, generate
from .logprobs import completion_logprobs
from .types import Rollout

__all__ = ["Rollout", "completion_logprobs", "extend_inputs", "fast_generate", "generate", "tile_batch"]
