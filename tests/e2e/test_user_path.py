"""The path users walk, for every tiny family and every shipped recipe of that family:

    vlm-lightning fit --config recipes/<family>/<recipe>.yaml   (+ tiny model, data, CPU/fp32, 3 steps)
    vlm-lightning export merge --checkpoint <run>/checkpoints/last.ckpt --out merged
    vlm-lightning export merge --checkpoint <run>/adapter --out merged_from_adapter
    vlm-lightning export gguf  --checkpoint merged --out gguf --quant f32      (llama.cpp reads it back)

Everything goes through ``vlm_lightning.cli.main`` (the console script's function; one test also runs the
installed ``vlm-lightning`` executable). The recipes' levers stay as shipped (``use_kernels``, ``fused_lora``,
``frozen_vision_no_grad``; the Triton kernels run in the interpreter on the CPU). Checks, per run:

- every LoRA-targeted merged tensor == base + scaling * B @ A from the checkpoint's own LoRA tensors
  (<= 1e-5 relative), every other tensor bit-identical to the base, the same key set as the base;
- ``config.architectures`` is the stock transformers class;
- the merged folder loads with plain ``AutoModelForImageTextToText`` + ``AutoProcessor`` (no missing or
  unexpected keys), the processor keeps the recipe's ``max_pixels``, and its logits on a batch with an
  image equal the trained adapter's (PEFT on the 16-bit base) at 1e-4;
- per family with a llama.cpp path: the GGUF's text and image+text logits agree with transformers;
- resume through the CLI (``--ckpt_path last``) continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlm_lightning.cli import main
from vlm_lightning.models.tiny import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

# family -> the recipes shipped for it
RECIPES = {f: sorted(p.stem for p in (ROOT / "recipes" / f).glob("*.yaml")) for f in TINY_FAMILIES}


def _recipe(family: str, name: str) -> Path:
    return ROOT / "recipes" / family / f"{name}.yaml"


def _recipe_yaml(family: str, name: str) -> dict:
    import yaml

    return yaml.safe_load(_recipe(family, name).read_text())


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="session")
def e2e_data(tmp_path_factory) -> dict[str, Path]:
    """OCR pairs (image + text) in the ``image_text`` format: what the SFT and the GRPO recipes both read."""
    root = tmp_path_factory.mktemp("e2e_data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        w, h = [(112, 56), (56, 56), (84, 56)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "text": str(rng.integers(10, 9999))})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return {"train": root / "train.jsonl", "val": root / "val.jsonl", "root": root}


# ------------------------------------------------------------------------------------------------- fit
def _fit_args(family: str, recipe: str, model_dir: Path, data: dict, out: Path, max_steps: int = 3) -> list[str]:
    args = ["fit", "--config", str(_recipe(family, recipe)),
            # overrides: the tiny model, the data, CPU/fp32, 3 optimizer steps of one micro-batch each (the
            # Triton kernels run in the interpreter here: each step costs seconds), where to write
            f"--model.init_args.model_name_or_path={model_dir}", "--model.init_args.dtype=float32",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32-true",
            f"--trainer.max_steps={max_steps}", "--trainer.accumulate_grad_batches=1",
            "--trainer.num_sanity_val_steps=0", f"--trainer.default_root_dir={out}",
            f"--data.train={data['train']}", "--data.num_workers=0", "--data.batch_size=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.callbacks+=vlm_lightning.callbacks.SaveAdapter",
            f"--trainer.callbacks.dirpath={out / 'adapter'}"]
    if "grpo" in recipe or "gspo" in recipe:
        # random tiny models rarely stop: keep rollouts short. Three GRPO steps of a random policy often see
        # equal rewards in every group (zero advantage, zero gradient), so B starts random (not zero) to give
        # the merge check a non-zero LoRA delta to verify.
        args += ["--model.init_args.max_new_tokens=4", "--model.init_args.init_lora_weights=false"]
    else:
        args += [f"--data.val={data['val']}"]
    return args


class Run:
    """One CLI fit and the exports made from it."""

    def __init__(self, family: str, recipe: str, base: Path, out: Path):
        self.family, self.recipe, self.base, self.out = family, recipe, base, out
        self.ckpt = out / "checkpoints" / "last.ckpt"
        self.adapter = out / "adapter"
        self._merged: dict[str, Path] = {}

    def merged(self, source: str = "ckpt") -> Path:
        """``vlm-lightning export merge`` from last.ckpt or the adapter folder (fp32), made once."""
        if source not in self._merged:
            target = self.out / f"merged_from_{source}"
            src = self.ckpt if source == "ckpt" else self.adapter
            assert main(["export", "merge", "--checkpoint", str(src), "--out", str(target), "--dtype", "float32"]) == 0
            self._merged[source] = target
        return self._merged[source]


@pytest.fixture(scope="session")
def fitted(tiny_vlm_dir, e2e_data, tmp_path_factory):
    """(family, recipe) -> Run, each recipe fitted once per session through the CLI."""
    runs: dict[tuple[str, str], Run] = {}

    def get(family: str, recipe: str) -> Run:
        if (family, recipe) not in runs:
            base = tiny_vlm_dir(family)
            out = tmp_path_factory.mktemp(f"{family}_{recipe}")
            main(_fit_args(family, recipe, base, e2e_data, out))
            run = Run(family, recipe, base, out)
            assert run.ckpt.is_file(), sorted(p.name for p in out.rglob("*"))
            assert (run.adapter / "adapter_config.json").is_file()
            runs[(family, recipe)] = run
        return runs[(family, recipe)]

    return get


# mllama: its LoRA recipe only (merge; it has no GGUF path), to keep the added runtime small; QLoRA loading and
# merging of mllama are tested in tests/models/test_loading.py and tests/export/test_merge.py
MATRIX = [(f, r) for f in TINY_FAMILIES for r in RECIPES[f] if f != "mllama" or r == "lora_sft"]


# ------------------------------------------------------------------------------------------- checks
def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).state_dict()


def _lora_deltas(ckpt_path: Path) -> dict[str, torch.Tensor]:
    """HF weight key -> scaling * B @ A (float64), from the checkpoint's own LoRA tensors and PEFT config."""
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cfg = ckpt["vlm_lightning"]["peft_config"]
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    prefix, a_suffix = "model.base_model.model.", ".lora_A.default.weight"
    deltas = {}
    for key, a in ckpt["state_dict"].items():
        if key.endswith(a_suffix):
            module = key[len(prefix):-len(a_suffix)]
            b = ckpt["state_dict"][key.replace(".lora_A.", ".lora_B.")]
            deltas[f"{module}.weight"] = scaling * (b.double() @ a.double())
    assert deltas, f"no LoRA tensors in {ckpt_path}"
    return deltas


@pytest.mark.parametrize("family,recipe", MATRIX, ids=[f"{f}-{r}" for f, r in MATRIX])
def test_merge_from_checkpoint_is_base_plus_lora(fitted, family, recipe):
    run = fitted(family, recipe)
    # on disk: the merged folder keeps the base's (hub) key layout, tensor for tensor
    assert set(_safetensors(run.merged("ckpt"))) == set(_safetensors(run.base))
    # as transformers sees them (module names, which PEFT's keys follow)
    base, merged = _state_dict(run.base), _state_dict(run.merged("ckpt"))
    deltas = _lora_deltas(run.ckpt)
    assert set(merged) == set(base), (set(merged) ^ set(base))
    assert set(deltas) <= set(base), sorted(set(deltas) - set(base))[:3]
    moved = 0
    for key, value in merged.items():
        if key in deltas:
            want = base[key].double() + deltas[key]
            err = float((value.double() - want).abs().max() / want.abs().max())
            assert err <= 1e-5, f"{key}: relative error {err:.2e}"
            moved += bool(deltas[key].abs().max() > 0)
        else:
            assert torch.equal(value, base[key]), f"{key} is not the base tensor"
    assert moved, "no LoRA delta is non-zero: the run did not train"
    config = json.loads((run.merged("ckpt") / "config.json").read_text())
    base_config = json.loads((run.base / "config.json").read_text())
    assert config["architectures"] == base_config["architectures"]
    assert not any(a.startswith("Fused") for a in config["architectures"])


def _image_batch(processor, family: str):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 112, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[img], return_tensors="pt")


@pytest.mark.parametrize("family,recipe", MATRIX, ids=[f"{f}-{r}" for f, r in MATRIX])
def test_merged_folder_is_what_the_adapter_computes(fitted, family, recipe):
    """The consumer: plain transformers loads the merged folder (no missing/unexpected keys), its processor
    keeps the recipe's pixel bounds, and its logits equal the trained adapter on the 16-bit base."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    run = fitted(family, recipe)
    from_ckpt, from_adapter = run.merged("ckpt"), run.merged("adapter")
    a, b = _safetensors(from_ckpt), _safetensors(from_adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    merged, info = AutoModelForImageTextToText.from_pretrained(from_ckpt, dtype=torch.float32,
                                                               output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    processor = AutoProcessor.from_pretrained(from_ckpt)
    max_pixels = (_recipe_yaml(family, recipe).get("data") or {}).get("max_pixels")
    if max_pixels is not None:
        if hasattr(processor.image_processor, "merge_size"):  # Qwen-VL: the pixel bounds are processor settings
            image_processor = processor.image_processor
            got = getattr(image_processor, "max_pixels", None) or image_processor.size["longest_edge"]
        else:  # other families: the data module resizes images before their processor; the export records it
            got = json.loads((from_ckpt / "merge_info.json").read_text())["processor_kwargs"].get("max_pixels")
        assert got == max_pixels, f"recipe max_pixels={max_pixels}, the export has {got}"

    trained = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(run.base, dtype=torch.float32),
                                        str(run.adapter)).eval()
    batch = _image_batch(processor, family)
    with torch.no_grad():
        want = trained(**batch).logits
        got = merged.eval()(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


LLAMA_FAMILIES = [f for f in TINY_FAMILIES if f not in ("llava_next", "mllama")]  # mllama: refused, below


def test_gguf_of_the_mllama_fit_is_refused_naming_llama_cpp(fitted, tmp_path, capsys):
    merged_dir = fitted("mllama", "lora_sft").merged("ckpt")
    assert main(["export", "gguf", "--checkpoint", str(merged_dir), "--out", str(tmp_path / "gguf")]) != 0
    assert "llama.cpp has no mllama support" in capsys.readouterr().err
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())


@pytest.mark.parametrize("family", LLAMA_FAMILIES)
def test_gguf_from_the_fit_reads_back_in_llama_cpp(fitted, family, tmp_path):
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_lightning.demo.llama_cpp import IMAGE_SIZE, hf_image_layout, mtmd_prompt, rel_err

    run = fitted(family, "lora_sft")
    merged_dir = run.merged("ckpt")
    assert main(["export", "gguf", "--checkpoint", str(merged_dir), "--out", str(tmp_path), "--quant", "f32",
                 "--mmproj-quant", "f32", "--name", family]) == 0
    model_gguf, mmproj = tmp_path / f"{family}-f32.gguf", tmp_path / f"mmproj-{family}-f32.gguf"
    assert model_gguf.is_file() and mmproj.is_file()

    model = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Total: 1,234.56"}]}],
                                         add_generation_prompt=True, tokenize=False)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    w, h = IMAGE_SIZE[family]
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (h, w, 3), dtype=np.uint8))
    img.save(tmp_path / "image.png")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read."}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[img], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        want_text = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        want_last = model(**inputs).logits[0, -1].numpy()

    # llama.cpp reads the files in a process of its own, as a consumer would
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    (tmp_path / "prompt.txt").write_text(mtmd_prompt(family, prompt))
    proc = subprocess.run([sys.executable, "-m", "vlm_lightning.demo.llama_cpp", str(model_gguf), str(mmproj),
                           str(tmp_path / "ids.json"), str(tmp_path / "prompt.txt"), str(tmp_path / "image.png"),
                           str(tmp_path / "llama.npz")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "llama.npz")
    assert rel_err(got["text_logits"], want_text) < 5e-3, rel_err(got["text_logits"], want_text)
    assert got["layout"].tolist() == hf_image_layout(family, model, processor, inputs["input_ids"][0].tolist())
    assert rel_err(got["last_logits"], want_last) < 5e-3, rel_err(got["last_logits"], want_last)


# --------------------------------------------------------------------------------------------- resume
def test_resume_through_the_cli_continues_exactly(tiny_vlm_dir, e2e_data, tmp_path):
    """6 steps in one go == 3 steps, then ``--ckpt_path last`` up to 6: same adapter weights. The checkpoint
    falls inside an epoch (8 rows, batch 1): the resumed run must start at the 4th batch of that epoch."""
    base = tiny_vlm_dir("qwen2_5_vl")
    whole, split = tmp_path / "whole", tmp_path / "split"
    main(_fit_args("qwen2_5_vl", "lora_sft", base, e2e_data, whole, max_steps=6))
    main(_fit_args("qwen2_5_vl", "lora_sft", base, e2e_data, split, max_steps=3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(_fit_args("qwen2_5_vl", "lora_sft", base, e2e_data, split, max_steps=6) + ["--ckpt_path=last"])
    assert not [w for w in caught if "not resumable" in str(w.message)]  # the train loader resumes mid-epoch
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(split / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    step = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert step == 6


# ------------------------------------------------------------------------------------ console script
def test_installed_console_script_runs_the_path(tiny_vlm_dir, e2e_data, tmp_path):
    """The ``vlm-lightning`` executable itself: fit, then export gguf straight from last.ckpt."""
    exe = shutil.which("vlm-lightning", path=str(Path(sys.executable).parent)) or shutil.which("vlm-lightning")
    assert exe, "the vlm-lightning console script is not installed"
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "run"
    fit = subprocess.run([exe, *_fit_args("qwen2_vl", "lora_sft", tiny_vlm_dir("qwen2_vl"), e2e_data, out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    exp = subprocess.run([exe, "export", "gguf", "--checkpoint", str(out / "checkpoints" / "last.ckpt"),
                          "--out", str(tmp_path / "gguf"), "--quant", "q8_0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert exp.returncode == 0, exp.stderr[-3000:]
    assert "Missing" not in exp.stderr and "newly initialized" not in exp.stderr, exp.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "gguf").glob("*.gguf")) == ["merged-q8_0.gguf", "mmproj-merged-f16.gguf"]
