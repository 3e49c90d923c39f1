"""GGUF export read back with gguf.GGUFReader: every tensor present with the right shape, values within
the quantisation tolerance, metadata complete (architecture, rope sections, projector type, tokenizer
with len(tokens) == token_embd rows, chat template, eos). llama.cpp itself loads the files in
tests/export/test_gguf_llama_cpp.py."""
from __future__ import annotations

import json
import sys

import gguf
import numpy as np
import pytest

from vlm_lightning.export.gguf import UnsupportedGGUFFamily, to_gguf
from vlm_lightning.export.gguf.arch import permute_rope
from vlm_lightning.export.gguf.writer import split_name

GGUF_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "gemma3", "pixtral", "mistral3", "mistral3_small", "qwen3_vl"]
TEXT_ARCH = {"qwen2_vl": "qwen2vl", "qwen2_5_vl": "qwen2vl", "gemma3": "gemma3", "pixtral": "llama",
             "mistral3": "mistral3", "mistral3_small": "mistral3", "qwen3_vl": "qwen3vl"}
PROJECTOR = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger", "gemma3": "gemma3", "pixtral": "pixtral",
             "mistral3": "pixtral", "mistral3_small": "pixtral", "qwen3_vl": "qwen3vl_merger"}
# max |dequant - source| / max |source| per quant type
TOL = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 1.5e-2}


def _tiny(tiny_vlm_dir, family):
    try:
        return tiny_vlm_dir(family)
    except NotImplementedError as err:  # fixture families arrive in stages
        pytest.skip(str(err))


def _fields(reader: gguf.GGUFReader) -> dict:
    out = {}
    for name, f in reader.fields.items():
        try:
            out[name] = f.contents()
        except Exception:  # noqa: BLE001 - exotic field types we do not check
            out[name] = None
    return out


def _tensors(reader: gguf.GGUFReader) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            for t in reader.tensors}


@pytest.fixture(scope="module")
def exported(tiny_vlm_dir, tmp_path_factory):
    """family -> quant -> (paths, source dir); built on first use."""
    cache: dict = {}

    def get(family: str, quant: str):
        key = (family, quant)
        if key not in cache:
            src = _tiny(tiny_vlm_dir, family)
            out = tmp_path_factory.mktemp(f"gguf_{family}_{quant}")
            cache[key] = (to_gguf(src, out, quant=quant, name=family), src)
        return cache[key]

    return get


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_text_gguf_metadata_and_tokenizer(exported, family):
    paths, src = exported(family, "f16")
    assert paths["model"].name == f"{family}-f16.gguf" and paths["mmproj"].name == f"mmproj-{family}-f16.gguf"
    cfg = json.loads((src / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    r = gguf.GGUFReader(paths["model"])
    f = _fields(r)
    arch = TEXT_ARCH[family]
    assert f["general.architecture"] == arch and f["general.type"] == "model"
    assert f[f"{arch}.block_count"] == text["num_hidden_layers"]
    assert f[f"{arch}.embedding_length"] == text["hidden_size"]
    assert f[f"{arch}.attention.head_count"] == text["num_attention_heads"]
    assert f[f"{arch}.attention.head_count_kv"] == text["num_key_value_heads"]
    if arch == "qwen2vl":
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        sections = f["qwen2vl.rope.dimension_sections"]
        assert len(sections) == 4 and sum(sections) == head_dim // 2

    tensors = {t.name: t for t in r.tensors}
    n_rows = int(tensors["token_embd.weight"].shape[1])  # ggml ne order: (hidden, vocab)
    assert n_rows == text["vocab_size"]
    assert len(f["tokenizer.ggml.tokens"]) == n_rows  # llama.cpp refuses a mismatch
    assert len(f["tokenizer.ggml.token_type"]) == n_rows
    assert f["tokenizer.ggml.model"] in ("gpt2", "llama")
    if f["tokenizer.ggml.model"] == "gpt2":
        assert len(f["tokenizer.ggml.merges"]) > 10

    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(src).tokenizer
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.tokens"][tok.eos_token_id] == tok.eos_token
    jinja = src / "chat_template.jinja"
    template = jinja.read_text() if jinja.exists() else tok.chat_template
    assert f["tokenizer.chat_template"] == template
    # every special token is a CONTROL token at its HF id
    for t in tok.all_special_tokens:
        i = tok.convert_tokens_to_ids(t)
        assert f["tokenizer.ggml.tokens"][i] == t
        assert f["tokenizer.ggml.token_type"][i] == gguf.TokenType.CONTROL

    # tied embeddings: no output tensor, untied: output present
    tied = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    assert ("output.weight" in tensors) == (not tied)
    n_layers = text["num_hidden_layers"]
    for i in range(n_layers):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            assert f"blk.{i}.{part}.weight" in tensors, (family, i, part)


def _source_text_weights(src, family) -> dict[str, np.ndarray]:
    """HF text weights under their GGUF names, transformed as llama.cpp expects (permute, +1 norms)."""
    from safetensors.torch import load_file

    cfg = json.loads((src / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[TEXT_ARCH[family]]
    tmap = gguf.get_tensor_name_map(arch, text["num_hidden_layers"])
    out = {}
    for fpath in sorted(src.glob("*.safetensors")):
        for k, v in load_file(fpath).items():
            part, rest = split_name(k)
            if part not in ("text", "lm_head"):
                continue
            name = tmap.get_name("lm_head.weight" if part == "lm_head" else f"model.{rest}",
                                 try_suffixes=(".weight", ".bias"))
            a = v.float().numpy()
            if family == "gemma3" and rest.endswith("norm.weight"):
                a = a + 1.0
            if TEXT_ARCH[family] in ("llama", "mistral3") and rest.endswith(("q_proj.weight", "k_proj.weight")):
                heads = text["num_attention_heads"] if "q_proj" in rest else text["num_key_value_heads"]
                a = permute_rope(a, heads)
            out[name] = a
    return out


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "pixtral"])
def test_text_values_within_quant_tolerance(exported, family, quant):
    paths, src = exported(family, quant)
    got = _tensors(gguf.GGUFReader(paths["model"]))
    want = _source_text_weights(src, family)
    assert set(got) == set(want), set(got) ^ set(want)
    for name, (qtype, arr) in got.items():
        ref = want[name]
        assert arr.shape == ref.shape, name
        if ref.ndim == 1 or name.endswith("_norm.weight"):
            assert qtype == "F32", name
        elif quant == "q8_0":
            # the tiny widths are multiples of 32, so everything 2-D is Q8_0
            assert qtype == "Q8_0", name
        else:
            assert qtype == quant.upper(), name
        err = np.abs(arr - ref).max() / max(np.abs(ref).max(), 1e-8)
        assert err <= TOL[qtype] + 1e-7, (name, qtype, err)


def test_rows_not_multiple_of_32_fall_back_to_f16(tiny_vlm_dir, tmp_path):
    from vlm_lightning.models.tiny import make_tiny_vlm

    # hidden 48: rows of 48 columns cannot be Q8_0 blocks of 32
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 4, 4]}
    src = make_tiny_vlm("qwen2_vl", tmp_path / "odd", text_config={"hidden_size": 48, "intermediate_size": 96,
                                                                    "num_attention_heads": 2, "num_key_value_heads": 1,
                                                                    "rope_parameters": rope},
                        vision_config={"hidden_size": 48})
    paths = to_gguf(src, tmp_path / "out", quant="q8_0", mmproj=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(paths["model"]).tensors}
    assert types["blk.0.attn_q.weight"] == "F16"  # 48 columns per row
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # 96 columns per row
    assert "mmproj" not in paths


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_mmproj_metadata_and_tensors(exported, family):
    paths, src = exported(family, "f16")
    cfg = json.loads((src / "config.json").read_text())
    text = {**cfg, **cfg.get("text_config", {})}
    r = gguf.GGUFReader(paths["mmproj"])
    f = _fields(r)
    assert f["general.architecture"] == "clip" and f["general.type"] == "mmproj"
    assert f["clip.projector_type"] == PROJECTOR[family]
    assert f["clip.has_vision_encoder"] is True
    assert f["clip.vision.projection_dim"] == text["hidden_size"]
    pre = {}
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (src / name).exists():
            d = json.loads((src / name).read_text())
            pre.update({**d, **d.get("image_processor", {})})
    np.testing.assert_allclose(f["clip.vision.image_mean"], pre["image_mean"], rtol=1e-6)
    np.testing.assert_allclose(f["clip.vision.image_std"], pre["image_std"], rtol=1e-6)
    for key in ("clip.vision.block_count", "clip.vision.embedding_length", "clip.vision.feed_forward_length",
                "clip.vision.attention.head_count", "clip.vision.patch_size", "clip.vision.image_size",
                "clip.vision.attention.layer_norm_epsilon"):
        assert f.get(key) is not None, key
    if family == "qwen2_5_vl":
        assert f["clip.vision.n_wa_pattern"] == cfg["vision_config"]["fullatt_block_indexes"][0] + 1
        assert f["clip.use_silu"] is True

    tensors = _tensors(r)
    n_blocks = f["clip.vision.block_count"]
    qkv = ("attn_qkv",) if family == "qwen3_vl" else ("attn_q", "attn_k", "attn_v")  # clip.cpp splits Qwen3-VL's
    for i in range(n_blocks):
        for part in (*qkv, "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            assert f"v.blk.{i}.{part}.weight" in tensors, (family, i, part)
    assert "v.patch_embd.weight" in tensors
    for name, (qtype, arr) in tensors.items():
        if arr.ndim == 1 or ".position_embd." in name or not name.endswith(".weight"):
            assert qtype == "F32", (name, qtype)
        assert np.isfinite(arr).all(), name


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_mmproj_splits_are_exact(exported, family):
    """Conv3d patch embedding -> two Conv2d halves; fused qkv -> q, k, v (F16 rounding only)."""
    from safetensors.torch import load_file

    paths, src = exported(family, "f32")  # an f32 text export still writes the f16 mmproj
    tensors = _tensors(gguf.GGUFReader(paths["mmproj"]))
    sd = {}
    for fpath in src.glob("*.safetensors"):
        sd.update({split_name(k)[1]: v.float().numpy() for k, v in load_file(fpath).items()
                   if split_name(k)[0] == "vision"})
    conv = sd["patch_embed.proj.weight"]
    both = np.stack([tensors["v.patch_embd.weight"][1], tensors["v.patch_embd.weight.1"][1]], axis=2)
    np.testing.assert_allclose(both, conv, atol=2e-3 * np.abs(conv).max())
    qkv = sd["blocks.0.attn.qkv.weight"]
    got = np.concatenate([tensors[f"v.blk.0.attn_{x}.weight"][1] for x in "qkv"], axis=0)
    np.testing.assert_allclose(got, qkv, atol=2e-3 * np.abs(qkv).max())
    assert tensors["mm.0.weight"][1].shape == sd["merger.mlp.0.weight"].shape
    assert tensors["v.post_ln.weight"][0] == "F32"


def test_llava_next_mmproj_refused_clearly(tiny_vlm_dir, tmp_path):
    # the text GGUF and the opt-in mmproj: tests/export/test_gguf_llava_next.py
    src = tiny_vlm_dir("llava_next")
    with pytest.raises(UnsupportedGGUFFamily, match="mmproj of 'llava_next' is not exact: llama.cpp's libmtmd"):
        to_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_mllama_refused_naming_the_missing_llama_cpp_support(tiny_vlm_dir, tmp_path):
    """Llama 3.2 Vision: llama.cpp has neither a text architecture for its cross-attention layers nor an mmproj type
    for its tiled encoder, so no GGUF (not even text-only: the cross-attention weights would be dropped)."""
    with pytest.raises(UnsupportedGGUFFamily, match=r"GGUF export of 'mllama' is not supported: llama\.cpp has no "
                                                    r"mllama support \(no text architecture .*cross-attention"):
        to_gguf(tiny_vlm_dir("mllama"), tmp_path / "out", mmproj=False)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_family_and_bad_inputs(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "idefics3"}))
    with pytest.raises(UnsupportedGGUFFamily, match="idefics3"):
        to_gguf(d, tmp_path / "out")
    with pytest.raises(ValueError, match="quant='q3'"):
        to_gguf(d, tmp_path / "out", quant="q3")
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="merge it first"):
        to_gguf(a, tmp_path / "out")


def test_kquant_without_llama_cpp_is_a_clear_error(tiny_vlm_dir, tmp_path, monkeypatch):
    src = tiny_vlm_dir("qwen2_vl")
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import fails as if not installed
    monkeypatch.setenv("PATH", str(tmp_path))  # and no llama-quantize binary
    with pytest.raises(RuntimeError, match="llama-cpp-python.*llama-quantize"):
        to_gguf(src, tmp_path / "out", quant="q4_k_m")
    assert not list((tmp_path / "out").glob("*.gguf")) if (tmp_path / "out").exists() else True


def test_mrope_sections_must_sum_to_half_head_dim(tmp_path):
    from vlm_lightning.models.tiny import make_tiny_vlm

    src = make_tiny_vlm("qwen2_vl", tmp_path / "bad", text_config={
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]}})
    with pytest.raises(ValueError, match="mrope_section"):
        to_gguf(src, tmp_path / "out", mmproj=False)


def build_spm_style_tokenizer(extra_specials: list[str]):
    """A Llama-2 / Gemma style tokenizer.json (as transformers 5 saves Gemma 3's): BPE with byte fallback,
    spaces normalised to '▁', no pre-tokenizer, <0xXX> byte tokens in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from vlm_lightning.models.tiny.tokenizer import _CORPUS

    plain = Tokenizer(models.BPE(unk_token="<unk>"))
    plain.normalizer = normalizers.Replace(" ", "\u2581")
    plain.train_from_iterator([_CORPUS] * 4,
                              trainer=trainers.BpeTrainer(vocab_size=300, min_frequency=2, show_progress=False))
    trained = json.loads(plain.to_str())["model"]
    head = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(head)}
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "\u2581")
    bpe.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bpe.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>", *extra_specials])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def gemma3_with_spm_tokenizer(src, dst):
    """Copy of the tiny Gemma 3 folder with its tokenizer swapped for the SentencePiece-style one."""
    import shutil

    shutil.copytree(src, dst)
    old = json.loads((dst / "tokenizer.json").read_text())
    extra = [a["content"] for a in old["added_tokens"] if a["content"] not in ("<pad>", "<eos>", "<bos>", "<unk>")]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (dst / name).unlink()
    tok = build_spm_style_tokenizer(extra)
    tok.save_pretrained(dst)
    return dst, tok


def test_sentencepiece_style_tokenizer_written_as_llama_spm(tiny_vlm_dir, tmp_path):
    src, tok = gemma3_with_spm_tokenizer(_tiny(tiny_vlm_dir, "gemma3"), tmp_path / "gemma3_spm")
    paths = to_gguf(src, tmp_path / "out", quant="f16", mmproj=False)
    f = _fields(gguf.GGUFReader(paths["model"]))
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.pre"] == "default"
    assert f["tokenizer.ggml.add_space_prefix"] is False  # Gemma: no '▁' prepended
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    byte_a = tok.convert_tokens_to_ids("<0x41>")
    assert tokens[byte_a] == "<0x41>" and types[byte_a] == gguf.TokenType.BYTE
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    # scores follow the BPE merge order: the token of an earlier merge scores higher
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    first, later = ["".join(m.split(" ", 1) if isinstance(m, str) else m) for m in (merges[0], merges[50])]
    assert scores[tok.convert_tokens_to_ids(first)] > scores[tok.convert_tokens_to_ids(later)]
