"""SFT on OCR/VQA-like rows of uneven length: HF+PEFT padded against ours padded and ours packed, one run.

Rows (written by this script, deterministic for --seed): one image per row whose width and height are each
drawn uniformly from 280-1000 px (Qwen2.5-VL turns that into 100-1,275 image tokens), a short question, and an
answer whose length in tokens is lognormal (median 40, sigma 1.0) clipped to 5-300, built from English words and
cut to that many tokens with the model's own tokenizer.

Arms, each in its own process, one epoch over the same rows in the same order (the DataModule's seed):
    hf_peft_padded   HF + PEFT LoRA r=16 on every language linear, gradient checkpointing, batches of
                     --batch rows padded to the longest (our DataModule's collation; HF's model and step)
    ours_padded      VisionSFTModule, all levers (kernels, vision no-grad, fused LoRA), --batch rows padded
    ours_packed      the same, packing=True with --max-tokens tokens per micro-batch (row boundaries kept)
Reported: samples/s and supervised tokens/s (answer tokens that carry a label) over the steps after --warmup,
peak GPU memory; ratios against hf_peft_padded. The model is the 7B shape of bench_sft_step.py (random weights).

Run (GPU): python benchmarks/bench_sft_realdata.py --out $OUT
Smoke (CPU): python benchmarks/bench_sft_realdata.py --tiny --rows 12 --out /tmp/realdata
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import time
from pathlib import Path

import utils
from bench_sft_step import add_processor, prepare_model_dir

ARMS = ["hf_peft_padded", "ours_padded", "ours_packed"]
WORDS = ("total invoice amount date name address street city form table column value number page line item "
         "price tax sum paid due order receipt account balance signature stamp code field entry record").split()
LEVERS = {"use_kernels": True, "frozen_vision_no_grad": True, "fused_lora": True}


def write_rows(root: Path, tokenizer, n: int, seed: int, tiny: bool) -> Path:
    """``root/train.jsonl`` in the "vqa" format with its images; returns the path."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    lo, hi = (56, 140) if tiny else (280, 1000)
    for i in range(n):
        w, h = rng.randint(lo, hi), rng.randint(lo, hi)
        img = Image.new("RGB", (w, h), tuple(rng.randint(180, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for y in range(4, h - 12, 16):  # lines of "text": the pixels only have to vary
            draw.text((4, y), " ".join(rng.choices(WORDS, k=6)), fill=(0, 0, 0))
        path = root / "images" / f"{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        img.save(path)
        n_tokens = int(min(300, max(5, rng.lognormvariate(3.689, 1.0))))  # median e^3.689 = 40 tokens
        text = " ".join(rng.choices(WORDS, k=n_tokens + 8))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
        answer = tokenizer.decode(ids).strip()
        rows.append({"image": str(path.relative_to(root)), "question": "What does the document say?",
                     "answer": answer})
    out = root / "train.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def datamodule(args, packing: bool):
    from vlm_lightning.data import VisionChatDataModule

    kw = {"packing": True, "max_tokens_per_batch": args.max_tokens} if packing else {}
    # max_pixels: the fixture processor's own cap (224 px) would shrink every image; Qwen2.5-VL's is 12.8 Mpx
    return VisionChatDataModule(str(args.model_dir), train=str(args.data), batch_size=args.batch,
                                num_workers=0 if args.tiny else 4, seed=0, format="vqa", max_pixels=12845056, **kw)


def batch_stats(batch) -> tuple[int, int]:
    """(rows, supervised tokens) of a collated batch: one image per row here."""
    rows = int(batch["image_grid_thw"].shape[0]) if "image_grid_thw" in batch else int(batch["labels"].shape[0])
    return rows, int((batch["labels"][..., 1:] != -100).sum())


def run_hf(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, device_map={"": device}, dtype=dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=utils.LANGUAGE_LINEARS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    accepted = set(inspect.signature(model.get_base_model().forward).parameters)
    dm = datamodule(args, packing=False)
    dm.setup("fit")
    steps = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for batch in dm.train_dataloader():
        batch = {k: v.to(device) for k, v in batch.items() if k in accepted and hasattr(v, "to")}
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        utils.sync()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        utils.sync()
        steps.append((time.perf_counter() - t0, *batch_stats(batch), float(loss)))
    return summarize(args, steps)


def run_ours(args, packing: bool) -> dict:
    import lightning as L
    import torch

    from vlm_lightning.modules import VisionSFTModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = VisionSFTModule(model_name_or_path=str(args.model_dir),
                             dtype="bfloat16" if device == "cuda" else "float32", r=16, lora_alpha=16,
                             finetune_vision_layers=False, gradient_checkpointing=args.checkpointing,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4), **LEVERS)
    steps, waits = [], []

    class Timer(L.Callback):
        t_end = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            utils.sync()
            if batch_idx == 0 and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
            if self.t_end is not None:  # between two steps: the DataLoader's wait and Lightning's own work
                waits.append(self.t0 - self.t_end)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            utils.sync()
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.t_end = time.perf_counter()
            steps.append((self.t_end - self.t0, *batch_stats(batch), float(loss)))

    profiler = [utils.profile_callback(3, args.out / f"realdata_profile_{args.child}.md")] if args.profile else []
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if device == "cuda" else "32-true", max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[Timer()] + profiler, limit_val_batches=0)
    torch.manual_seed(1)
    trainer.fit(module, datamodule=datamodule(args, packing))
    return {**summarize(args, steps), "between_steps_s": waits}


def summarize(args, steps: list[tuple]) -> dict:
    import torch

    warm = steps[args.warmup:] or steps
    secs = sum(s[0] for s in warm)
    rows = sum(s[1] for s in warm)
    sup = sum(s[2] for s in warm)
    return {"steps": len(steps), "measured_steps": len(warm), "rows_total": sum(s[1] for s in steps),
            "samples_per_s": rows / secs, "supervised_tokens_per_s": sup / secs,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
            "losses": [s[3] for s in steps], "step_times": [s[0] for s in steps]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--rows", type=int, default=192)
    p.add_argument("--batch", type=int, default=8, help="rows per padded batch")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens per packed micro-batch")
    p.add_argument("--checkpointing", default="full", help="ours' gradient_checkpointing mode")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--profile", action="store_true", help="ours arms: trace step 3 (top GPU kernels, busy share)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model_dir = args.model_dir or Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")
    if args.child:
        res = run_hf(args) if args.child == "hf_peft_padded" else run_ours(args, args.child == "ours_packed")
        print("RESULT " + json.dumps(res), flush=True)
        return
    if args.tiny:
        args.max_tokens = min(args.max_tokens, 1024)
        args.warmup = min(args.warmup, 1)
    prepare_model_dir(args.model_dir, args.tiny)
    add_processor(args.model_dir)
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(args.model_dir).tokenizer
    args.data = write_rows(args.model_dir.parent / f"realdata_{args.rows}_{args.seed}", tok, args.rows, args.seed,
                           args.tiny)
    results = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(args.model_dir), "--data", str(args.data),
               "--batch", str(args.batch), "--max-tokens", str(args.max_tokens), "--warmup", str(args.warmup),
               "--checkpointing", args.checkpointing, "--out", str(args.out)] + (["--tiny"] if args.tiny else [])
        cmd += ["--profile"] if args.profile else []
        res = utils.run_child(arm, cmd)
        if "error" in res:
            results[arm] = res
            continue
        results[arm] = res
        print(f"[{arm}] {results[arm]['samples_per_s']:.2f} samples/s, "
              f"{results[arm]['supervised_tokens_per_s']:.0f} supervised tok/s, peak {results[arm]['peak_gib']}",
              flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    ref = results.get("hf_peft_padded", {})
    lines = ["| arm | steps | samples/s | supervised tok/s | peak GiB | x HF+PEFT samples/s |",
             "|---|---|---|---|---|---|"]
    for arm, r in results.items():
        if "error" in r:
            lines.append(f"| {arm} | failed | | | | {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        ratio = r["samples_per_s"] / ref["samples_per_s"] if "samples_per_s" in ref else float("nan")
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        lines.append(f"| {arm} | {r['steps']} | {r['samples_per_s']:.2f} | {r['supervised_tokens_per_s']:,.0f} | "
                     f"{peak} | {ratio:.2f}x |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sft_realdata.md").write_text(table + "\n")
    cfg = {"shape": "tiny" if args.tiny else "qwen2.5-vl-7b", "rows": args.rows, "batch": args.batch,
           "max_tokens": args.max_tokens, "checkpointing": args.checkpointing, "seed": args.seed,
           "image_px": "56-140" if args.tiny else "280-1000", "answer_tokens": "lognormal median 40, 5-300"}
    utils.append_jsonl(args.out / "sft_realdata.jsonl",
                       [utils.record("sft_realdata", arm, cfg, r) for arm, r in results.items()])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
