"""Carry a transformers tokenizer into GGUF metadata the way llama.cpp's converter does.

Two tokenizer models are handled, picked from `tokenizer.json`:
- byte-level BPE (Qwen, Mistral Tekken, the tiny test tokenizers) -> `tokenizer.ggml.model = "gpt2"`, with
  `tokenizer.ggml.pre` read off the pre-tokenizer regex (llama.cpp re-implements each regex by name);
- SentencePiece-style BPE with byte fallback (Gemma, Llama 2) -> `"llama"` (SPM), scores from merge ranks.

The token list is padded with `[PAD{i}]` (type UNUSED) up to the rows of the embedding matrix, because
llama.cpp requires `len(tokens) == token_embd rows`. Merges, special ids and the chat template come
from `gguf.SpecialVocab` (it reads `chat_template.jinja`, where transformers 5 saves the template).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import gguf

__all__ = ["write_vocab", "detect_pre_tokenizer", "PRE_TOKENIZER_REGEXES"]

# The HF regex of each llama.cpp pre-tokenizer type we support (llama-vocab.cpp keeps its own copy).
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
           r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_REGEXES = {"qwen2": _QWEN2, "llama-bpe": _LLAMA3, "tekken": _TEKKEN}


def _split_regexes(pre: dict | None) -> tuple[list[str], bool]:
    """All Split regexes in a tokenizer.json pre_tokenizer, and whether a ByteLevel step uses GPT-2's regex."""
    if not pre:
        return [], False
    if pre.get("type") == "Sequence":
        regexes, gpt2 = [], False
        for p in pre.get("pretokenizers", []):
            r, g = _split_regexes(p)
            regexes += r
            gpt2 = gpt2 or g
        return regexes, gpt2
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or pat.get("String") or ""], False
    if pre.get("type") == "ByteLevel":
        return [], bool(pre.get("use_regex", True))
    return [], False


def detect_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a byte-level BPE tokenizer.json; raises if unknown."""
    regexes, gpt2_regex = _split_regexes(tokenizer_json.get("pre_tokenizer"))
    if not regexes and gpt2_regex:
        return "gpt-2"
    for name, regex in PRE_TOKENIZER_REGEXES.items():
        if regexes == [regex]:
            return name
    raise ValueError(
        f"this tokenizer's pre-tokenizer regex {regexes} (ByteLevel regex: {gpt2_regex}) matches none llama.cpp "
        f"implements here ({', '.join(['gpt-2', *PRE_TOKENIZER_REGEXES])}); pass tokenizer_pre= to to_gguf"
    )


def _looks_special(token: str) -> bool:
    # as llama.cpp's converter (`does_token_look_special`)
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") or (
        token.startswith("<unused") and token.endswith(">"))


def write_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_rows: int, tokenizer_pre: str | None = None) -> dict:
    """Add the tokenizer of `model_dir` to `writer`, padded to `n_rows` tokens. Returns a summary."""
    tj_path = Path(model_dir) / "tokenizer.json"
    if not tj_path.is_file():
        raise FileNotFoundError(f"{tj_path} missing: GGUF export needs the fast tokenizer's tokenizer.json")
    tj = json.loads(tj_path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{tj_path}: tokenizer model {model.get('type')!r} is not supported for GGUF (BPE only)")
    if model.get("byte_fallback"):
        return _write_llama_hf(writer, Path(model_dir), n_rows, tj)
    return _write_gpt2(writer, Path(model_dir), tj, n_rows, tokenizer_pre or detect_pre_tokenizer(tj))


def _tokens_by_id(tj: dict, n_rows: int) -> tuple[dict[int, str], dict[int, dict]]:
    """(id -> token text over the model vocab and the added tokens, id -> added-token entry); refuses ids past
    the embedding's rows."""
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    vocab.update({a["content"]: i for i, a in added.items()})
    if max(vocab.values()) >= n_rows:
        raise ValueError(f"tokenizer has id {max(vocab.values())} but the embedding has only {n_rows} rows")
    return {i: t for t, i in vocab.items()}, added


def _is_special(entry: dict, tok: str) -> bool:
    return bool(entry.get("special") or _looks_special(tok))


def _added_type(entry: dict, tok: str) -> gguf.TokenType:
    """An added token is CONTROL when special (by its flag or its look), else USER_DEFINED."""
    return gguf.TokenType.CONTROL if _is_special(entry, tok) else gguf.TokenType.USER_DEFINED


def _write_gpt2(writer, model_dir: Path, tj: dict, n_rows: int, pre: str) -> dict:
    reverse, added = _tokens_by_id(tj, n_rows)
    tokens, types = [], []
    for i in range(n_rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        types.append(_added_type(added[i], tok) if i in added else gguf.TokenType.NORMAL)
        tokens.append(tok)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    if not special.merges:
        raise ValueError(f"{model_dir}/tokenizer.json has no BPE merges: llama.cpp cannot tokenise without them")
    return {"model": "gpt2", "pre": pre, "n_tokens": len(tokens), "special_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template)}


def _write_llama_hf(writer, model_dir: Path, n_rows: int, tj: dict) -> dict:
    """SentencePiece-style BPE (byte fallback, '▁' for spaces) -> llama.cpp's SPM tokenizer ("llama").

    llama.cpp's SPM tokenizer merges the adjacent pair whose joined text has the highest score; scoring
    each token by minus the rank of the BPE merge that creates it reproduces the BPE merge order (gguf's
    LlamaHfVocab gives every token the same score -1000, which loses the merge order).
    """
    model = tj["model"]
    reverse, added = _tokens_by_id(tj, n_rows)
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    tokens, scores, types = [], [], []
    for i in range(n_rows):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if i in added:
            types.append(_added_type(added[i], tok))
            tok = tok if _is_special(added[i], tok) else tok.replace("\u2581", " ")
            scores.append(-1000.0)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            types.append(gguf.TokenType.BYTE)
            scores.append(0.0)
        elif tok == unk:
            types.append(gguf.TokenType.UNKNOWN)
            scores.append(0.0)
        else:
            types.append(gguf.TokenType.NORMAL)
            scores.append(-float(rank[tok] + 1) if tok in rank else 0.0)
        tokens.append(tok)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_prepends_space(tj.get("normalizer")))
    special = gguf.SpecialVocab(model_dir, n_vocab=len(tokens))
    special.add_to_gguf(writer, quiet=True)
    return {"model": "llama", "pre": "default", "n_tokens": len(tokens), "special_ids": dict(special.special_token_ids),
            "chat_template": bool(special.chat_template)}


def _prepends_space(normalizer: dict | None) -> bool:
    """Whether the tokenizer puts '▁' before the text (Llama 2 yes, Gemma no)."""
    if not normalizer:
        return False
    if normalizer.get("type") == "Sequence":
        return any(_prepends_space(n) for n in normalizer.get("normalizers", []))
    return normalizer.get("type") == "Prepend" and normalizer.get("prepend") == "\u2581"
