"""Inputs of the end-to-end chain (benchmarks/bench_e2e.sh): the base models and the OCR data, built locally.

* ``<work>/base``: a random-weight Qwen2.5-VL with the 7B shape (``utils.QWEN25_VL_7B``; ``--tiny``: the CPU
  shape of ``utils.tiny_qwen25_overrides``), saved as bf16 safetensors, so it is the 16-bit base a merge
  reloads. The processor is our tiny fixture's (no hub here); the config's special-token ids (image pad,
  vision start/end, bos/eos/pad) are set to that tokenizer's ids, so rows built by the data module hit the
  model's image slots. The vocabulary stays 152064 rows (the tokenizer is smaller, as with real Qwen).
* ``<work>/small``: the small Qwen2.5-VL of ``tests/gpu/fsdp_smoke.py`` (4 decoder layers of width 512, 4 vision
  blocks) for the strategy recipes; ``--tiny``: the test-fixture size.
* ``<work>/data``: ``make_demo_ocr_dataset`` rows (one 112x56 image of 2-4 digits each, the answer is the
  digits), jsonl with images beside it.

Prints one JSON line (``RESULT {...}``) with the build and save times.

    python benchmarks/e2e/prepare.py --work /tmp/e2e            # GPU: 7B shape, built on the GPU
    python benchmarks/e2e/prepare.py --work /tmp/e2e --tiny     # CPU dry run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for the shared utils.py

import utils  # noqa: E402

# the strategy runs' model: tests/gpu/fsdp_smoke.py's SMALL_QWEN25 (kept in sync by hand: that script is a CLI)
SMALL_QWEN25 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 2},
    "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                      "out_hidden_size": 512, "fullatt_block_indexes": [3]},
}
_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id",
            "bos_token_id", "eos_token_id", "pad_token_id")


def build_base(path: Path, proc_dir: Path, tiny: bool) -> dict:
    """The 7B-shape (or tiny-shape) base in bf16 with the fixture processor; returns timings."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    if (path / "config.json").exists():
        return {"reused": True}
    t0 = time.perf_counter()
    fixture = json.loads((proc_dir / "config.json").read_text())
    cfg = json.loads(json.dumps(utils.QWEN25_VL_7B))
    if tiny:
        for k, v in utils.tiny_qwen25_overrides().items():
            cfg[k].update(v)
    for key in _ID_KEYS:
        if fixture.get(key) is not None:
            cfg[key] = fixture[key]
            cfg["text_config"][key] = fixture[key]
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    if device == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    model.save_pretrained(path, max_shard_size="5GB")
    AutoProcessor.from_pretrained(proc_dir).save_pretrained(path)
    t2 = time.perf_counter()
    del model
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"params": n_params, "build_s": round(t1 - t0, 1), "save_s": round(t2 - t1, 1),
            "safetensors_gb": round(size / 1e9, 2), "device": device, "architectures": config.architectures}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU shapes (dry run of the chain)")
    p.add_argument("--n-train", type=int, default=400)
    p.add_argument("--n-val", type=int, default=16)
    p.add_argument("--skip-base", action="store_true", help="only the small model and the data")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from vlm_lightning.demo.data import make_demo_ocr_dataset
    from vlm_lightning.models.tiny import make_tiny_vlm

    proc_dir = work / "fixture_qwen2_5_vl"
    if not (proc_dir / "config.json").exists():
        make_tiny_vlm("qwen2_5_vl", proc_dir, seed=0)
    out: dict = {"stage": "prepare", "tiny": args.tiny}
    if not args.skip_base:
        out["base"] = build_base(work / "base", proc_dir, args.tiny)
    small = work / "small"
    if not (small / "config.json").exists():
        t = time.perf_counter()
        make_tiny_vlm("qwen2_5_vl", small, seed=0, **({} if args.tiny else SMALL_QWEN25))
        # a 16-bit base, like the 7B one: merges reload it in bf16 and the check compares bytes
        import torch
        from transformers import AutoModelForImageTextToText

        AutoModelForImageTextToText.from_pretrained(small, dtype=torch.bfloat16).save_pretrained(small)
        out["small_build_s"] = round(time.perf_counter() - t, 1)
    data = make_demo_ocr_dataset(work / "data", n_train=args.n_train, n_val=args.n_val, seed=0)
    out["data"] = {k: str(v) for k, v in data.items()}
    out["n_train"], out["n_val"] = args.n_train, args.n_val
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
