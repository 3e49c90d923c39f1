"""Full GRPO step speed with the speed levers on: VisionGRPOModule through the Lightning Trainer.

Shape (as ``bench_grpo_rollout.py``): Qwen2.5-VL-7B (real config, random bf16 weights, saved once), LoRA r=16 on
every language-model linear, 8 prompts x 8 generations x 256 new tokens, one 448x448 image per prompt,
temperature 1.0. Levers: ``use_kernels``, ``fused_lora``, ``frozen_vision_no_grad``, ``gradient_checkpointing``
(``--checkpointing``), ``cache_vision_features``, ``max_tokens_per_micro_batch`` (``--max-tokens``), rollout
correction "auto" (TIS on the fast engine). Each config runs in its own process (peak memory does not leak).

Configs:
  dapo_b0_it1      loss_type dapo, beta 0, num_iterations 1 (no old / reference forward)
  dapo_b004_it2    loss_type dapo, beta 0.04, num_iterations 2 (old + reference log-probs, 2 optimiser steps)
Printed per config: the median full-step time over the steps after the first (warm-up), the median rollout time
(sampling, inside the step) and the rollout's new tokens/s (new tokens / rollout time), peak memory, the number
of micro-batches, the vision-cache counts and the rollout mismatch (k3 KL). ``--levers off`` (or ``both``) runs
the same configs with every lever off for an A/B. ``--profile`` adds one profiled step per config and prints the
torch.profiler top-kernel table (by self CUDA time; CPU time on the CPU).
Deliberately left out: real data and rewards (a cheap id-length reward), multi-GPU, HF generate baselines
(``bench_grpo_rollout.py`` has them).

Run (GPU):   python benchmarks/bench_grpo_step.py --out $OUT                 (two configs, ~6 min on one H200)
             python benchmarks/bench_grpo_step.py --out $OUT --levers both --profile
Smoke (CPU): python benchmarks/bench_grpo_step.py --tiny --out /tmp/grpo_step_bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import utils
from bench_grpo_rollout import prompt_batch
from bench_sft_step import add_processor, prepare_model_dir

CONFIGS = {
    "dapo_b0_it1": dict(loss_type="dapo", beta=0.0, num_iterations=1),
    "dapo_b004_it2": dict(loss_type="dapo", beta=0.04, num_iterations=2),
}


def lever_kwargs(on: bool, args) -> dict:
    if not on:
        return dict(use_kernels=False, fused_lora=False, frozen_vision_no_grad=False, gradient_checkpointing=True,
                    cache_vision_features=False, max_tokens_per_micro_batch=None,
                    generations_per_micro_batch=max(1, args.generations // 4))
    return dict(use_kernels=args.device == "cuda",  # Triton kernels: GPU only (the CPU smoke runs them off)
                fused_lora=True, frozen_vision_no_grad=True, gradient_checkpointing=args.checkpointing,
                cache_vision_features=True, max_tokens_per_micro_batch=args.max_tokens)


def run_config(name: str, levers: bool, args) -> dict:
    import lightning as L
    import torch
    from transformers import AutoConfig

    from vlm_lightning.modules.grpo import VisionGRPOModule

    add_processor(Path(args.model_dir))
    cuda = args.device == "cuda"
    config = AutoConfig.from_pretrained(args.model_dir)

    def id_length_reward(prompts, completions, completion_ids=None, **kw):
        return [(len(ids) % 7) / 7.0 for ids in completion_ids]

    module = VisionGRPOModule(
        str(args.model_dir), reward_funcs=[id_length_reward], num_generations=args.generations,
        max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, dtype="bfloat16" if cuda else "float32",
        r=16, lora_alpha=16, finetune_vision_layers=False, log_completions=0, **CONFIGS[name],
        **lever_kwargs(levers, args))
    batch = prompt_batch(config, args.prompts, args.image_side, args.text_len, "cpu")
    batch.update(references=["0123"] * args.prompts, row_index=list(range(args.prompts)),
                 prompts=["read the digits"] * args.prompts)
    n_batches = args.steps + (1 if args.profile else 0)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(n_batches):
                yield batch

    steps: list[dict] = []
    prof_table: list[str] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            if i == 1 and cuda:
                torch.cuda.reset_peak_memory_stats()
            self.prof = None
            if args.profile and i == args.steps:  # the extra, last batch: profiled, not timed
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
            utils.sync()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            utils.sync()
            dt = time.perf_counter() - self.t0
            if self.prof is not None:
                self.prof.__exit__(None, None, None)
                key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
                prof_table.append(self.prof.key_averages().table(sort_by=key, row_limit=args.profile_rows))
                return
            m, stats = pl_module.last_rollout_metrics, pl_module.last_rollout_stats
            steps.append({"step_s": dt, "rollout_s": m["time/rollout_s"], "new_tokens": stats.get("new_tokens"),
                          "micro_batches": m.get("micro_batches"), "vision_cache": stats.get("vision_cache"),
                          "mismatch_kl": m.get("rollout_correction/kl"), "backend": stats.get("backend")})

    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-true" if cuda else "32-true",
                        max_steps=n_batches * CONFIGS[name]["num_iterations"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Timer()])
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    warm = steps[1:] or steps
    rollout_s = statistics.median(s["rollout_s"] for s in warm)
    new_tokens = statistics.median(s["new_tokens"] for s in warm)
    return {"config": name, "levers": levers, "median_step_s": statistics.median(s["step_s"] for s in warm),
            "median_rollout_s": rollout_s, "rollout_new_tokens": new_tokens,
            "rollout_tokens_per_s": new_tokens / rollout_s if rollout_s else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "steps": steps,
            "profile": prof_table[0] if prof_table else None}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--levers", choices=["on", "off", "both"], default="on")
    p.add_argument("--checkpointing", default="full", help="gradient_checkpointing with the levers on")
    p.add_argument("--max-tokens", type=int, default=16384, help="max_tokens_per_micro_batch with the levers on")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--text-len", type=int, default=32)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--steps", type=int, default=4, help="timed steps (the first is the warm-up)")
    p.add_argument("--profile", action="store_true", help="one more, profiled step: top-kernel table")
    p.add_argument("--profile-rows", type=int, default=25)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny config")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-levers", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")
    if args.tiny and not args.child:
        args.prompts, args.generations, args.new_tokens, args.image_side, args.text_len = 2, 2, 8, 112, 8
        args.steps, args.max_tokens = 2, 256
    if args.child:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        print("RESULT " + json.dumps(run_config(args.child, args.child_levers == "on", args)), flush=True)
        return

    prepare_model_dir(args.model_dir, args.tiny)
    results = []
    for name in args.configs.split(","):
        for lev in (["on", "off"] if args.levers == "both" else [args.levers]):
            cmd = [sys.executable, __file__, "--child", name, "--child-levers", lev, "--model-dir", str(args.model_dir)]
            for flag in ("prompts", "generations", "new_tokens", "text_len", "image_side", "steps", "max_tokens",
                         "profile_rows"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            cmd += ["--checkpointing", str(args.checkpointing)] + (["--profile"] if args.profile else [])
            r = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                print(f"[{name} levers={lev}] FAILED rc={r.returncode}\n{r.stderr[-3000:]}", flush=True)
                results.append({"config": name, "levers": lev == "on", "error": r.stderr[-1500:]})
                continue
            res = json.loads(line[-1][7:])
            results.append(res)
            brief = {k: v for k, v in res.items() if k not in ("steps", "profile")}
            print(f"[{name} levers={lev}] {json.dumps(brief)}", flush=True)
            if res.get("profile"):
                print(f"[{name} levers={lev}] profiler, one step:\n{res['profile']}", flush=True)
    report(results, args)


def report(results: list[dict], args) -> None:
    lines = [f"GRPO step, {'tiny' if args.tiny else 'Qwen2.5-VL-7B shape'}: {args.prompts} prompts x "
             f"{args.generations} generations x {args.new_tokens} new tokens, {args.image_side}px image, LoRA r=16",
             "", "| config | levers | full step (median s) | rollout (median s) | rollout new tok/s | peak GiB | "
             "micro-batches | vision cache | mismatch KL |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['levers']} | failed: {r['error'].strip().splitlines()[-1][:80]} |")
            continue
        last = r["steps"][-1]
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        kl = f"{last['mismatch_kl']:.2e}" if last.get("mismatch_kl") is not None else "-"
        lines.append(f"| {r['config']} | {'on' if r['levers'] else 'off'} | {r['median_step_s']:.2f} | "
                     f"{r['median_rollout_s']:.2f} | {r['rollout_tokens_per_s']:,.0f} | {peak} | "
                     f"{last['micro_batches']:.0f} | {last['vision_cache']} | {kl} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_full_step.md").write_text(text + "\n")
    cfg = {"shape": "tiny" if args.tiny else "qwen2.5-vl-7b", "prompts": args.prompts,
           "generations": args.generations, "new_tokens": args.new_tokens, "image": f"{args.image_side}px",
           "lora_r": 16, "checkpointing": args.checkpointing, "max_tokens_per_micro_batch": args.max_tokens}
    rows = [utils.record("grpo_full_step", f"{r['config']}_levers_{'on' if r['levers'] else 'off'}", cfg,
                         {k: v for k, v in r.items() if k not in ("config", "profile")}) for r in results]
    utils.append_jsonl(args.out / "grpo_full_step.jsonl", rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
