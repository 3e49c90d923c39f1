"""LoRA / QLoRA SFT step speed and memory: ours (VisionSFTModule through the Lightning Trainer) against
HF+PEFT (with and without gradient checkpointing), HF+PEFT+Liger and HF+PEFT 4-bit, side by side.

Shape: Qwen2.5-VL-7B (real config, random weights), LoRA r=16 on every language-model linear,
batch 4 x 2048 tokens, one 448x448 image per row, AdamW, median step time after warm-up.
Each arm runs in its own process (so peak memory and patched modules never leak between arms).

Leaves out: Unsloth (run with its own harness on this shape; RESULTS.md) and real data (bench_sft_realdata.py).

MFU formula (per optimizer step):
    FLOPs = tokens * (4 * N_frozen_lm + 6 * N_lora) + 6 * L * T * d * tokens / 2 (causal attention, fwd+bwd)
            + 2 * N_vision * patches (frozen vision tower, forward only)
    MFU = FLOPs / step_time / 989e12 (H200 dense bf16 datasheet); recompute is not counted.

Ours, lever by lever (``OURS_ARMS``: VisionSFTModule kwargs per arm):
    ours_lora / ours_qlora        the module's defaults (full checkpointing, PEFT forward, no kernels)
    ours_lora_kernels             + use_kernels (fused norms, RoPE, gated MLP, linear cross-entropy)
    ours_lora_vision_nograd       + frozen_vision_no_grad (frozen vision tower without autograd)
    ours_lora_fused               + fused_lora (LoRA update addmm'd into the base GEMM output)
    ours_lora_all                 kernels + vision no-grad + fused LoRA (full checkpointing)
    ours_lora_all_every2 / _every4 / _attn / _nogc / _lean / _offload   ... other checkpointing modes
    ours_lora_all_compile         ... + torch.compile of each decoder layer
    ours_qlora_all                4-bit with kernels + vision no-grad + fused LoRA
``--levers '{"fused_lora": true}'`` merges extra kwargs into every ours arm; ``--kernels`` sets use_kernels.

Run (GPU):  python benchmarks/bench_sft_step.py --out $OUT       (all arms, ~8 min on one H200)
Profile (GPU): ... --arms ours_lora_all --profile ours_lora_all   (torch.profiler table of step --warmup)
Smoke (CPU): python benchmarks/bench_sft_step.py --tiny --arms hf_peft_gc,ours_lora,ours_lora_all --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import utils

ARMS = ["hf_peft_gc", "hf_peft_liger_gc", "hf_peft_nogc", "hf_qlora_gc", "ours_lora", "ours_qlora"]
_ALL = {"use_kernels": True, "frozen_vision_no_grad": True, "fused_lora": True}
OURS_ARMS = {  # arm -> VisionSFTModule kwargs on top of the shared LoRA r=16 setup (see the docstring)
    "ours_lora": {},
    "ours_qlora": {"quantization": "4bit"},
    "ours_lora_kernels": {"use_kernels": True},
    "ours_lora_vision_nograd": {"frozen_vision_no_grad": True},
    "ours_lora_fused": {"fused_lora": True},
    "ours_lora_all": dict(_ALL),
    **{f"ours_lora_all_{k}": {**_ALL, "gradient_checkpointing": v} for k, v in
       {"every2": "every_2", "every4": "every_4", "attn": "attention", "nogc": False, "lean": "lean",
        "offload": "offload"}.items()},
    "ours_qlora_all_lean": {**_ALL, "quantization": "4bit", "gradient_checkpointing": "lean"},
    "ours_qlora_all_offload": {**_ALL, "quantization": "4bit", "gradient_checkpointing": "offload"},
    "ours_lora_all_compile": {**_ALL, "compile_layers": True},
    "ours_qlora_all": {**_ALL, "quantization": "4bit"},
}
H200_BF16_PEAK = 989.4e12


def prepare_model_dir(path: Path, tiny: bool) -> Path:
    """Random-weight Qwen2.5-VL(-7B shape) saved once, with our fixture's processor (and its token ids)."""
    import torch
    from transformers import AutoModelForImageTextToText

    if (path / "config.json").exists():
        return path
    path.mkdir(parents=True, exist_ok=True)
    config = utils.build_config(tiny=tiny)
    add_processor(path)  # the special-token ids follow the fixture processor saved beside the weights
    fixture = json.loads((path.parent / "tiny_processor_src" / "config.json").read_text())
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, key, fixture[key])
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size="5GB")
    del model
    return path


def add_processor(path: Path) -> None:
    """Save the tiny fixture's processor beside the weights (ours loads one from there)."""
    if (path / "processor_config.json").exists() or (path / "preprocessor_config.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    from transformers import AutoProcessor

    from vlm_lightning.models.tiny import make_tiny_vlm

    tiny_dir = make_tiny_vlm("qwen2_5_vl", path.parent / "tiny_processor_src")
    AutoProcessor.from_pretrained(tiny_dir).save_pretrained(path)


def lora_param_counts(model) -> tuple[int, int, int]:
    """(frozen language-model params incl. lm_head, excl. embeddings; LoRA params; vision params).

    Counted on a meta-device copy built from the config, so 4-bit packing (two weights per byte) does
    not halve the count."""
    import torch
    from transformers import AutoModelForImageTextToText

    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    with torch.device("meta"):
        ref = AutoModelForImageTextToText.from_config(model.config)
    lm = sum(p.numel() for n, p in ref.named_parameters() if "language_model" in n and "embed_tokens" not in n)
    lm += sum(p.numel() for n, p in ref.named_parameters() if n.endswith("lm_head.weight"))
    vis = sum(p.numel() for n, p in ref.named_parameters() if ".visual." in n or n.startswith("visual"))
    return lm, lora, vis


def step_flops(config, batch: dict, n_lm: int, n_lora: int, n_vis: int) -> float:
    tokens = batch["input_ids"].numel()
    tc = config.text_config
    T = batch["input_ids"].shape[1]
    attn = 6 * tc.num_hidden_layers * T * tc.hidden_size * tokens / 2
    patches = batch["pixel_values"].shape[0]
    return tokens * (4 * n_lm + 6 * n_lora) + attn + 2 * n_vis * patches


def run_hf_arm(arm: str, args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kw = {"dtype": dtype}
    if arm == "hf_qlora_gc":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["visual", "lm_head"])
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, device_map={"": device}, **kw)
    if arm == "hf_peft_liger_gc":
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

        apply_liger_kernel_to_qwen2_5_vl(model=model)
    if arm == "hf_qlora_gc":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    gc = arm != "hf_peft_nogc"
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=utils.LANGUAGE_LINEARS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = utils.synthetic_vlm_batch(model.config, args.batch, args.seq_len, image_side=args.image_side, seed=0,
                                      device=device)
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    n_lm, n_lora, n_vis = lora_param_counts(model)
    return summarize(arm, args, model.config, batch, times, losses, n_lm, n_lora, n_vis)


def run_ours_arm(arm: str, args) -> dict:
    import lightning as L
    import torch
    from transformers import AutoConfig

    from vlm_lightning.modules import VisionSFTModule

    add_processor(Path(args.model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = ours_kwargs(arm, args)
    module = VisionSFTModule(model_name_or_path=str(args.model_dir),
                             dtype="bfloat16" if device == "cuda" else "float32",
                             r=16, lora_alpha=16, finetune_language_layers=True,
                             finetune_vision_layers=False, finetune_attention_modules=True,
                             finetune_mlp_modules=True,
                             # same optimizer as the HF arms, so the loss curves are comparable
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4), **kwargs)
    config = AutoConfig.from_pretrained(args.model_dir)
    batch = utils.synthetic_vlm_batch(config, args.batch, args.seq_len, image_side=args.image_side, seed=0)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(args.steps):
                yield batch

    timer = utils.StepTimer(device)
    extra = ([utils.profile_callback(max(args.warmup - 1, 0), args.out / f"profile_{arm}.md")]
             if arm in args.profile.split(",") else [])
    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if device == "cuda" else "32-true", max_steps=args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer, *extra])
    t_fit = time.perf_counter()
    torch.manual_seed(1)  # as the HF arms seed just before LoRA init
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    n_lm, n_lora, n_vis = lora_param_counts(module.model)
    out = summarize(arm, args, config, batch, timer.times, timer.losses, n_lm, n_lora, n_vis)
    out["first_step_s_after_load"] = timer.first_step_end - timer.fit_start if timer.fit_start else None
    out["fit_total_s"] = time.perf_counter() - t_fit
    out["module_kwargs"] = kwargs
    return out


def ours_kwargs(arm: str, args) -> dict:
    """VisionSFTModule kwargs of an ours arm: the arm's levers, then --kernels and --levers on top."""
    if arm not in OURS_ARMS:
        raise SystemExit(f"unknown arm {arm!r}; ours arms: {', '.join(OURS_ARMS)}")
    kwargs = {"quantization": None, "gradient_checkpointing": True, "use_kernels": False, **OURS_ARMS[arm]}
    if args.kernels:
        kwargs["use_kernels"] = True
    kwargs.update(json.loads(args.levers) if args.levers else {})
    return kwargs


def summarize(arm, args, config, batch, times, losses, n_lm, n_lora, n_vis) -> dict:
    import statistics

    import torch

    warm = times[args.warmup:] or times
    med = statistics.median(warm)
    tokens = batch["input_ids"].numel()
    flops = step_flops(config, batch, n_lm, n_lora, n_vis)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"arm": arm, "median_step_s": med, "tokens_per_s": tokens / med,
            "peak_gib": peak, "mfu": flops / med / H200_BF16_PEAK, "losses": losses,
            "n_lm_frozen": n_lm, "n_lora": n_lora, "n_vision": n_vis, "step_times": times}


def max_batch(arm: str, args) -> int | None:
    """Largest batch (x seq_len tokens) that runs one step, doubling from --max-batch-start (or --batch)."""
    best = None
    b = args.max_batch_start or args.batch
    while b <= 1024:
        cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(args.model_dir), "--batch", str(b),
               "--seq-len", str(args.seq_len), "--steps", "1", "--warmup", "0",
               "--image-side", str(args.image_side)]
        cmd += child_flags(args) + ["--profile", ""]  # the search runs are not profiled
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0 or "RESULT " not in r.stdout:
            break
        best = b
        b *= 2
    return best


def child_flags(args) -> list[str]:
    return ((["--kernels"] if args.kernels else []) + (["--levers", args.levers] if args.levers else [])
            + ["--out", str(args.out), "--profile", args.profile, "--memory-cap-gib", str(args.memory_cap_gib)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny config")
    p.add_argument("--kernels", action="store_true", help="ours with use_kernels=True")
    p.add_argument("--levers", default="", help="JSON object of VisionSFTModule kwargs merged into every ours "
                                                "arm, e.g. '{\"gradient_checkpointing\": \"every_2\"}'")
    p.add_argument("--profile", default="", help="comma list of ours arms to trace one step of (torch.profiler)")
    p.add_argument("--max-batch-search", default="", help="comma list of arms to search the max batch for")
    p.add_argument("--max-batch-start", type=int, default=0, help="first batch the search tries (default --batch)")
    p.add_argument("--memory-cap-gib", type=float, default=0, help="cap each arm's GPU memory (e.g. 80 on an H200)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")

    if args.levers:
        try:
            levers = json.loads(args.levers)
        except json.JSONDecodeError as err:
            raise SystemExit(f"--levers: not JSON ({err}): {args.levers!r}") from err
        if not isinstance(levers, dict):
            raise SystemExit(f"--levers: expected a JSON object of VisionSFTModule kwargs, got {args.levers!r}")
    if args.child:
        utils.cap_gpu_memory(args.memory_cap_gib)
        fn = run_ours_arm if args.child.startswith("ours") else run_hf_arm
        res = fn(args.child, args)
        print("RESULT " + json.dumps(res), flush=True)
        return

    if args.tiny:
        args.seq_len = min(args.seq_len, 128)
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 1)
        args.image_side = 112
    t0 = time.perf_counter()
    prepare_model_dir(args.model_dir, args.tiny)
    print(f"model dir ready in {time.perf_counter() - t0:.1f}s: {args.model_dir}", flush=True)
    unknown = [a for a in args.arms.split(",") if a not in ARMS and a not in OURS_ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; arms: {', '.join(dict.fromkeys([*ARMS, *OURS_ARMS]))}")
    results = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(args.model_dir),
               "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--image-side", str(args.image_side)]
        cmd += (["--tiny"] if args.tiny else []) + child_flags(args)
        res = utils.run_child(arm, cmd)
        if "error" in res:
            results[arm] = res
            continue
        results[arm] = res
        print(f"[{arm}] {res['tokens_per_s']:.0f} tok/s, peak {res['peak_gib']} GiB, "
              f"losses {[round(x, 4) for x in res['losses'][:5]]}", flush=True)
    for arm in filter(None, args.max_batch_search.split(",")):
        if arm in results and "error" not in results[arm]:
            results[arm]["max_batch_2048"] = max_batch(arm, args)
            print(f"[{arm}] max batch: {results[arm]['max_batch_2048']}", flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    ok = {k: v for k, v in results.items() if "error" not in v}
    ref = ok.get("hf_peft_gc")
    base = ok.get("ours_lora")  # lever-by-lever ratios
    lines = ["| arm | tokens/s | peak GiB | MFU | max batch | x HF+PEFT gc | x ours_lora | loss diff vs HF (first 5) |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        if "error" in r:
            lines.append(f"| {arm} | failed | | | | | | {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        ratio = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
        diff = (max(abs(a - b) for a, b in zip(r["losses"][:5], ref["losses"][:5]))
                if ref else float("nan"))
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        vs_ours = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        lines.append(f"| {arm} | {r['tokens_per_s']:,.0f} | {peak} | {r['mfu']:.1%} | "
                     f"{r.get('max_batch_2048', '-')} | {ratio:.2f}x | {vs_ours:.2f}x | {diff:.4f} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sft_step.md").write_text(table + "\n")
    cfg = {"shape": "qwen2.5-vl-7b" if not args.tiny else "tiny", "batch": args.batch,
           "seq_len": args.seq_len, "steps": args.steps, "warmup": args.warmup, "lora_r": 16,
           "image": "448x448", "kernels": args.kernels, "levers": args.levers}
    rows = [utils.record("sft_step", arm, cfg, {k: v for k, v in r.items() if k != "arm"})
            for arm, r in results.items()]
    utils.append_jsonl(args.out / "sft_step.jsonl", rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
