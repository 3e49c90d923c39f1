"""Write a merged transformers VLM folder as GGUF: `<name>-<quant>.gguf` (language model) and
`mmproj-<name>-f16.gguf` (vision tower + projector), the pair llama.cpp's `llama-mtmd-cli` /
`llama-server --mmproj` and llama-cpp-python's multimodal chat handlers load.

F32/F16/BF16/Q8_0 are written here with gguf-py's numpy quantisers; K-quants (q4_k_m, q5_k_m, q6_k)
go through llama.cpp's own quantiser (llama-cpp-python in process, else a `llama-quantize` binary).
Which layout a family gets, and its converters, live in `arch.py`; the tokenizer in `vocab.py`.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open

from ..atomic import atomic_file
from ..hub import push_folder
from .arch import UnsupportedGGUFFamily, layout_for_config
from .llava_next import MMPROJ_CAVEAT as LLAVA_NEXT_CAVEAT
from .vocab import write_vocab

__all__ = ["GGUF_QUANTS", "kquant_backend", "to_gguf"]

_Q = gguf.GGMLQuantizationType
_PY_QUANTS = {"f32": _Q.F32, "f16": _Q.F16, "bf16": _Q.BF16, "q8_0": _Q.Q8_0}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
# llama.cpp's enum llama_ftype values
_K_QUANTS = {"q4_k_m": (15, "Q4_K_M"), "q5_k_m": (17, "Q5_K_M"), "q6_k": (18, "Q6_K")}
GGUF_QUANTS = tuple(_PY_QUANTS) + tuple(_K_QUANTS)


# ----------------------------------------------------------------------------------------------------
# reading the merged folder

# Weights are read with their on-disk names, which differ between transformers versions (5.x saves Qwen2-VL as
# `model.layers.*` / `visual.*`, older/newer ones as `model.language_model.*` / `model.visual.*`): `split_name`
# folds every variant into (part, rest) with part one of text / lm_head / vision / projector.
_TEXT_PREFIXES = ("model.language_model.model.", "model.language_model.", "language_model.model.", "language_model.")
_VISION_PREFIXES = ("model.visual.", "visual.", "model.vision_tower.", "vision_tower.", "model.vision_model.")
_PROJ_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def split_name(key: str) -> tuple[str, str]:
    """('text'|'lm_head'|'vision'|'projector'|'other', rest) for an on-disk weight name."""
    if key in ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight"):
        return "lm_head", "weight"
    if key in ("image_newline", "model.image_newline"):  # LLaVA-NeXT's row separator, beside the projector
        return "projector", "image_newline"
    for p in _TEXT_PREFIXES:
        if key.startswith(p):
            return "text", key[len(p):]
    for p in _VISION_PREFIXES:
        if key.startswith(p):
            rest = key[len(p):]
            return "vision", rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
    for p in _PROJ_PREFIXES:
        if key.startswith(p):
            return "projector", key[len(p):]
    if key.startswith("model."):  # Qwen2-VL's legacy on-disk layout: model.layers.*, model.embed_tokens
        return "text", key[len("model."):]
    return "other", key


class _Weights:
    """Lazy access to every tensor of a (sharded) safetensors folder, as float32 numpy arrays."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {model_dir}: merge the adapter first "
                                    "(vlm-lightning export merge)")
        self._where: dict[str, Path] = {}
        self._open = {}
        for f in files:
            handle = safe_open(str(f), framework="pt")
            self._open[f] = handle
            for k in handle.keys():
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> np.ndarray:
        t = self._open[self._where[key]].get_tensor(key)
        return t.to(torch.float32).numpy() if t.is_floating_point() else t.numpy()


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: to_gguf needs a merged transformers folder")
    cfg = json.loads(path.read_text())
    top = {k: v for k, v in cfg.items() if k not in ("text_config", "vision_config")}
    cfg["_text"] = {**top, **(cfg.get("text_config") or {})}
    return cfg


def _read_preprocessor(model_dir: Path) -> dict:
    pre: dict = {}
    for fname in ("preprocessor_config.json", "processor_config.json"):
        p = model_dir / fname
        if p.is_file():
            d = json.loads(p.read_text())
            pre.update({**d, **(d.get("image_processor") or {})})
    return pre


# ----------------------------------------------------------------------------------------------------
# dtype policy (as llama.cpp's ModelBase.prepare_tensors)


def _quantize(arr: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == _Q.F32:
        return arr, _Q.F32
    try:
        return gguf.quants.quantize(arr, qtype), qtype
    except gguf.QuantError:  # rows not a multiple of the block size (32 for Q8_0)
        return gguf.quants.quantize(arr, _Q.F16), _Q.F16


def _text_qtype(gname: str, arr: np.ndarray, quant: str):
    if arr.ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return _Q.F32
    return _PY_QUANTS[quant]


def _vision_qtype(gname: str, arr: np.ndarray, quant: str):
    if arr.ndim <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") or ".position_embd." in gname:
        return _Q.F32
    if "input_projection" in gname:  # llama.cpp#13025: Gemma 3's projector stays F16
        return _Q.F16
    if ".patch_embd." in gname or gname.startswith("mm.patch_merger"):
        return _Q.F16 if quant == "f16" else _Q.F32
    return _PY_QUANTS[quant]


# ----------------------------------------------------------------------------------------------------
# K-quants through llama.cpp


def kquant_backend() -> str | None:
    """'llama_cpp' (llama-cpp-python importable), 'llama-quantize' (binary on PATH) or None."""
    try:
        import llama_cpp  # noqa: F401  # optional dependency (the test extra)

        return "llama_cpp"
    except Exception:  # ImportError, or the shared library failing to load
        pass
    return "llama-quantize" if shutil.which("llama-quantize") else None


def _kquantize(src: Path, dst: Path, quant: str, backend: str) -> None:
    ftype, name = _K_QUANTS[quant]
    if backend == "llama_cpp":
        import llama_cpp  # optional dependency (the test extra)

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = max(1, (os.cpu_count() or 2) // 2)
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {name}) failed with code {rc}")
    else:
        proc = subprocess.run(["llama-quantize", str(src), str(dst), name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-quantize {name} failed ({proc.returncode}): {proc.stderr[-2000:]}")


# ----------------------------------------------------------------------------------------------------
# writers


def _arch_enum(arch: str):
    return {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]


def _write_text(path: Path, model_dir: Path, cfg: dict, fam, weights: _Weights, quant: str, name: str,
                tokenizer_pre: str | None) -> dict:
    t = cfg["_text"]
    n_layers = t["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(_arch_enum(fam.text_arch), n_layers)
    keys = {}
    for k in weights.keys():
        part, rest = split_name(k)
        if part in ("text", "lm_head"):
            keys[k] = (part, rest)
    embed = next((k for k, (p, r) in keys.items() if p == "text" and r == "embed_tokens.weight"), None)
    if embed is None:
        raise ValueError(f"{model_dir}: no embed_tokens weight found among the text weights")
    n_rows = weights.shape(embed)[0]
    tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))

    w = gguf.GGUFWriter(path, arch=fam.text_arch, use_temp_file=True)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    fam.text_kv(w, cfg)
    w.add_file_type(_FILE_TYPES[quant])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = write_vocab(w, model_dir, n_rows, tokenizer_pre)

    written: dict[str, str] = {}
    for k, (part, rest) in sorted(keys.items()):
        if part == "lm_head" and tied:
            continue
        hf = "lm_head.weight" if part == "lm_head" else f"model.{rest}"
        gname = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"text weight {k!r} has no llama.cpp {fam.text_arch} tensor name: "
                             "refusing a partial export")
        arr = weights.get(k)
        if fam.text_transform is not None:
            arr = fam.text_transform(rest, arr, cfg)
        data, qtype = _quantize(arr, _text_qtype(gname, arr, quant))
        w.add_tensor(gname, data, raw_dtype=qtype)
        written[gname] = qtype.name
    _finish(w)
    return {"tensors": written, "vocab": vocab}


def _write_mmproj(path: Path, model_dir: Path, cfg: dict, fam, weights: _Weights, quant: str, name: str) -> dict:
    pre = _read_preprocessor(model_dir)
    w = gguf.GGUFWriter(path, arch="clip", use_temp_file=True)
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[quant])
    fam.vision_kv(w, cfg, pre)
    written: dict[str, str] = {}

    def add(gname: str, arr: np.ndarray) -> None:
        data, qtype = _quantize(arr, _vision_qtype(gname, arr, quant))
        w.add_tensor(gname, data, raw_dtype=qtype)
        written[gname] = qtype.name

    for k in sorted(weights.keys()):
        part, rest = split_name(k)
        if part not in ("vision", "projector"):
            continue
        try:
            for gname, arr in fam.vision_tensors(rest, weights.get(k), cfg):
                add(gname, arr)
        except KeyError:
            raise ValueError(f"vision weight {k!r} has no llama.cpp mmproj tensor name ({fam.name}): "
                             "refusing a partial export") from None
    if fam.extra_vision_tensors is not None:
        tj = json.loads((model_dir / "tokenizer.json").read_text())
        ids = {a["content"]: a["id"] for a in tj.get("added_tokens", [])}
        embed = next(k for k in weights.keys() if split_name(k) == ("text", "embed_tokens.weight"))
        for gname, arr in fam.extra_vision_tensors(lambda rest: weights.get(embed), cfg, ids):
            add(gname, arr)
    if not written:
        raise ValueError(f"{model_dir}: no vision weights found, cannot write the mmproj")
    _finish(w)
    return {"tensors": written}


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def to_gguf(
    merged_dir: str | Path,
    out_dir: str | Path,
    quant: str = "f16",
    name: str | None = None,
    mmproj: bool = True,
    mmproj_quant: str = "f16",
    tokenizer_pre: str | None = None,
    keep_intermediate: bool = False,
    push_to_hub: str | None = None,
    private: bool = True,
    approximate_mmproj: bool = False,
) -> dict[str, Path]:
    """Export a merged VLM folder to GGUF for llama.cpp; returns {"model": path, "mmproj": path}.

    `quant` is one of f32, f16, bf16, q8_0 (written in Python) or q4_k_m, q5_k_m, q6_k (llama.cpp's
    quantiser, through llama-cpp-python or `llama-quantize`). Vision tower + projector always go to
    `mmproj-<name>-<mmproj_quant>.gguf` (f16 or f32). Families: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, Pixtral,
    Mistral 3; any other raises `UnsupportedGGUFFamily` before a file is written (never a silent
    text-only export). `tokenizer_pre` overrides the detected llama.cpp pre-tokenizer name. LLaVA-NeXT: the text
    GGUF is exact, but llama.cpp's image path cannot reproduce its anyres token layout (``llava_next.py``), so its
    mmproj raises unless `approximate_mmproj=True` (or `mmproj=False` for the text model alone).

    Example:
        >>> to_gguf("runs/demo/merged", "runs/demo/gguf", quant="q8_0")  # doctest: +SKIP
        {'model': PosixPath('runs/demo/gguf/merged-q8_0.gguf'),
         'mmproj': PosixPath('runs/demo/gguf/mmproj-merged-f16.gguf')}
    """
    model_dir, out = Path(merged_dir), Path(out_dir)
    quant, mmproj_quant = quant.lower(), mmproj_quant.lower()
    if quant not in GGUF_QUANTS:
        raise ValueError(f"quant={quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    if mmproj_quant not in ("f16", "f32", "bf16", "q8_0"):
        raise ValueError(f"mmproj_quant={mmproj_quant!r}: choose f16, f32, bf16 or q8_0")
    if (model_dir / "adapter_config.json").is_file() and not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is a LoRA adapter: merge it first (merge_lora / `vlm-lightning export merge`)")
    cfg = _read_config(model_dir)
    fam = layout_for_config(cfg)  # raises for unsupported families before anything is written
    if mmproj and fam.projector_type == "mlp" and not approximate_mmproj:
        raise UnsupportedGGUFFamily(
            f"GGUF mmproj of {fam.name!r} is not exact: {LLAVA_NEXT_CAVEAT}. Export the (exact) text model alone "
            "with mmproj=False (`--no-mmproj`), or write the approximate mmproj with approximate_mmproj=True "
            "(`--approximate-mmproj`); no GGUF file was written")
    backend = None
    if quant in _K_QUANTS:
        backend = kquant_backend()
        if backend is None:
            raise RuntimeError(
                f"quant={quant!r} needs llama.cpp's quantiser: `pip install llama-cpp-python` or put `llama-quantize` "
                "on PATH (f32/f16/bf16/q8_0 need neither)")
    name = name or model_dir.resolve().name
    out.mkdir(parents=True, exist_ok=True)
    weights = _Weights(model_dir)
    paths: dict[str, Path] = {}

    # every file is written under a temporary name and renamed when complete (an interrupted export leaves
    # no file that looks whole)
    text_path = out / f"{name}-{quant}.gguf"
    if backend is None:
        with atomic_file(text_path) as tmp:
            _write_text(tmp, model_dir, cfg, fam, weights, quant, name, tokenizer_pre)
    else:
        f16_path = out / f"{name}-f16.gguf"
        existed = f16_path.exists()
        with atomic_file(f16_path) as tmp:
            _write_text(tmp, model_dir, cfg, fam, weights, "f16", name, tokenizer_pre)
        try:
            with atomic_file(text_path) as tmp:
                _kquantize(f16_path, tmp, quant, backend)
        finally:
            if not keep_intermediate and not existed:
                f16_path.unlink(missing_ok=True)
        if keep_intermediate:
            paths["model_f16"] = f16_path
    paths["model"] = text_path
    if mmproj:
        mm_path = out / f"mmproj-{name}-{mmproj_quant}.gguf"
        with atomic_file(mm_path) as tmp:
            _write_mmproj(tmp, model_dir, cfg, fam, weights, mmproj_quant, name)
        paths["mmproj"] = mm_path
    if push_to_hub:
        push_folder(out, push_to_hub, private=private, allow_patterns=["*.gguf", "*.md"],
                    commit_message=f"Upload GGUF ({quant}) with vlm-lightning")
    return paths
