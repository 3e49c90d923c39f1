"""GRPO rollout speed: HF ``generate`` (LoRA active / merged) against ours (``vlm_lightning.rollout.fast_generate``),
with a logits-agreement check, plus one full VisionGRPOModule step (rollout + scoring + loss/backward).

Shape: Qwen2.5-VL-7B (real config, random bf16 weights, saved once), LoRA r=16 on every language-model linear
(B filled with small noise so the adapter changes the function), 8 prompts x 8 generations = 64 sequences x
256 new tokens, one 448x448 image per prompt (256 image tokens; prompts left padded 0..14 tokens),
temperature 1.0, top-p 1.0, top-k off. Each arm runs in its own process (peak memory does not leak).

Arms:
  hf_generate_lora    PeftModel.generate on the 64 tiled rows (the baseline of issue 6: 517 tok/s measured)
  hf_generate_merged  merge_and_unload() then generate
  ours                fast_generate (LoRA merged while sampling, shared prefix, static cache, CUDA-graph decode);
                      also: top-p 0.95, no CUDA graphs, and the logits agreement on the first 16 greedy steps
                      against HF generate with the LoRA active (plus HF-merged vs HF-LoRA as the bf16 noise floor)
  grpo_step           VisionGRPOModule (rollout_backend="auto" -> fast_generate) through the Lightning Trainer:
                      median step time after one warm-up step, and its rollout share
Deliberately left out: TRL GRPOTrainer (its VLM path re-runs HF generate, i.e. the hf_generate_lora arm plus its
trainer overhead; not worth the GPU minutes), vLLM, real data/rewards (the reward is a cheap id-length function).

Run (GPU):   python benchmarks/bench_grpo_rollout.py --out $OUT     (~5 min on one H200, incl. saving the weights)
Smoke (CPU): python benchmarks/bench_grpo_rollout.py --tiny --out /tmp/grpo_bench
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import utils
from bench_sft_step import add_processor, prepare_model_dir

ARMS = ["hf_generate_lora", "hf_generate_merged", "ours", "grpo_step"]
EOS = [151645, 151643]  # <|im_end|>, <|endoftext|>
PAD = 151643


def prompt_batch(config, n_prompts: int, image_side: int, text_len: int, device) -> dict:
    """n prompts: [16 text] <vision_start> <image_pad> x 256 <vision_end> [text_len text], row i left padded 2*i."""
    import torch

    n_img = (image_side // 14) ** 2 // 4
    seq_len = 16 + n_img + 2 + text_len
    b = utils.synthetic_vlm_batch(config, n_prompts, seq_len, image_side=image_side, seed=0)
    b.pop("labels")
    for i in range(n_prompts):
        k = min(2 * i, 15)
        b["input_ids"][i, :k] = PAD
        b["attention_mask"][i, :k] = 0
    b["pixel_values"] = b["pixel_values"].to(torch.bfloat16 if device == "cuda" else torch.float32)
    return {k: v.to(device) for k, v in b.items()}


def load_policy(args, device):
    """The random-weight model from disk + LoRA r=16 (adapter B ~ N(0, 0.01): not a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=dtype, device_map={"": device})
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=utils.LANGUAGE_LINEARS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model.eval()


def timed_rollout(model, inputs, args, device, **kw) -> tuple[dict, object]:
    import torch

    from vlm_lightning.rollout import fast_generate

    base = dict(num_generations=args.generations, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0,
                eos_token_ids=EOS, pad_token_id=PAD)
    base.update(kw)
    warm = dict(base, max_new_tokens=min(8, args.new_tokens))
    fast_generate(model, inputs, generator=None, **warm)  # cuBLAS / allocator warm-up (not timed)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    utils.sync()
    t0 = time.perf_counter()
    out = fast_generate(model, inputs, **base)
    utils.sync()
    dt = time.perf_counter() - t0
    new_tokens = int(out.completion_mask.sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"seconds": dt, "new_tokens": new_tokens, "tokens_per_s": new_tokens / dt, "peak_gib": peak,
            "backend": out.backend, "steps": out.stats.get("steps"), "prefill_s": out.stats.get("prefill_s"),
            "decode_s": out.stats.get("decode_s"), "graph_error": out.stats.get("graph_error"),
            "truncated_frac": float(out.truncated.float().mean())}, out


def agreement(ref, other) -> dict:
    """Greedy runs of the same prompts: logits compared at every step whose earlier tokens agree."""
    import torch

    a, b = ref.logits, other.logits  # (N, C, V)
    c = min(a.shape[1], b.shape[1])
    same_tok = (ref.completion_ids[:, :c] == other.completion_ids[:, :c])  # (N, C)
    # step t is comparable when tokens < t agree
    prefix_ok = torch.cat([torch.ones_like(same_tok[:, :1]), same_tok[:, :-1].cumprod(1).bool()], 1)
    diff = (a[:, :c] - b[:, :c]).abs().amax(-1)  # (N, C)
    d = diff[prefix_ok]
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "ref_logit_std": float(a[:, :c].std()),
            "rows_all_tokens_equal": float(same_tok.all(1).float().mean()), "compared_steps": int(prefix_ok.sum())}


def run_generate_arm(arm: str, args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_policy(args, device)
    if arm == "hf_generate_merged":
        model = model.merge_and_unload()
    inputs = prompt_batch(model.config, args.prompts, args.image_side, args.text_len, device)
    res, _ = timed_rollout(model, inputs, args, device, backend="hf")
    return {"arm": arm, **res, "prompt_len": inputs["input_ids"].shape[1]}


def run_ours_arm(arm: str, args) -> dict:
    import torch

    from vlm_lightning.rollout import fast_generate
    from vlm_lightning.rollout.lora import merged_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_policy(args, device)
    inputs = prompt_batch(model.config, args.prompts, args.image_side, args.text_len, device)
    res, _ = timed_rollout(model, inputs, args, device)
    out = {"arm": arm, **res, "prompt_len": inputs["input_ids"].shape[1]}
    if args.profile and device == "cuda":
        out["profile"] = profile_rollout(model, inputs, args)
    out["top_p_0.95"], _ = timed_rollout(model, inputs, args, device, top_p=0.95)
    out["no_fused_decode"], _ = timed_rollout(model, inputs, args, device, fuse_decode=False)
    out["no_cuda_graphs"], _ = timed_rollout(model, inputs, args, device, use_cuda_graphs=False)
    out["no_prefix_sharing"], _ = timed_rollout(model, inputs, args, device, share_prefix=False)
    # logits agreement, greedy, first K steps (EOS off so every row runs K steps)
    k = min(args.agree_steps, args.new_tokens)
    greedy = dict(num_generations=args.generations, max_new_tokens=k, temperature=0, eos_token_ids=[],
                  pad_token_id=PAD, return_logits=True)
    ref = fast_generate(model, inputs, backend="hf", **greedy)  # HF generate, LoRA active
    with merged_lora(model):
        hf_merged = fast_generate(model, inputs, backend="hf", merge_lora=False, **greedy)
    ours = fast_generate(model, inputs, **greedy)
    ours_unmerged = fast_generate(model, inputs, merge_lora=False, **greedy)
    out["agreement"] = {"ours_vs_hf_lora": agreement(ref, ours),
                        "ours_unmerged_vs_hf_lora": agreement(ref, ours_unmerged),
                        "hf_merged_vs_hf_lora": agreement(ref, hf_merged), "steps": k}
    noise = out["agreement"]["hf_merged_vs_hf_lora"]["max_abs"]
    out["agreement"]["ours_within_bf16_tolerance"] = (
        out["agreement"]["ours_vs_hf_lora"]["max_abs"] <= 2 * noise + (1e-3 if device == "cpu" else 5e-2))
    return out


def profile_rollout(model, inputs, args) -> str:
    """torch.profiler over one rollout (CUDA-graph kernels included): the top-kernel table, also written to
    ``--out``/rollout_profile.md."""
    from torch.profiler import ProfilerActivity, profile

    from vlm_lightning.rollout import fast_generate

    kw = dict(num_generations=args.generations, max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0,
              eos_token_ids=EOS, pad_token_id=PAD)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        utils.sync()
        t0 = time.perf_counter()
        out = fast_generate(model, inputs, **kw)
        utils.sync()
        dt = time.perf_counter() - t0
    table = (f"rollout {args.prompts}x{args.generations} x {args.new_tokens} new tokens, backend {out.backend}, "
             f"prefill {out.stats['prefill_s']:.3f} s, decode {out.stats['decode_s']:.3f} s\n\n"
             + utils.profile_table(prof, dt, top=30))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rollout_profile.md").write_text(table + "\n")
    print(table, flush=True)
    return table


def run_grpo_arm(arm: str, args) -> dict:
    import lightning as L
    import torch

    from vlm_lightning.modules.grpo import VisionGRPOModule

    add_processor(Path(args.model_dir))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import AutoConfig  # heavy import: the ids follow the fixture processor saved with the model

    config = AutoConfig.from_pretrained(args.model_dir)

    def id_length_reward(prompts, completions, completion_ids=None, **kw):
        return [(len(ids) % 7) / 7.0 for ids in completion_ids]

    module = VisionGRPOModule(
        str(args.model_dir), reward_funcs=[id_length_reward], num_generations=args.generations,
        max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0,
        generations_per_micro_batch=max(1, args.generations // 2), dtype="bfloat16" if device == "cuda" else "float32",
        r=16, lora_alpha=16, finetune_vision_layers=False, gradient_checkpointing=True, log_completions=0)
    batch = prompt_batch(config, args.prompts, args.image_side, args.text_len, "cpu")
    batch.update(references=["0123"] * args.prompts, row_index=list(range(args.prompts)),
                 prompts=["read the digits"] * args.prompts)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(args.grpo_steps):
                yield batch

    times, rollout = [], []

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, b, i):
            utils.sync()
            if i == 1 and device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            utils.sync()
            times.append(time.perf_counter() - self.t0)
            stats = getattr(pl_module, "last_rollout_stats", {}) or {}
            rollout.append(stats)

    trainer = L.Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-true" if device == "cuda" else "32-true", max_steps=args.grpo_steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Timer()])
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    warm = times[1:] or times
    last = rollout[-1] if rollout else {}
    roll_s = (last.get("prefill_s") or 0) + (last.get("decode_s") or 0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"arm": arm, "median_step_s": statistics.median(warm), "step_times": times,
            "rollout_backend": last.get("backend"), "rollout_s": roll_s, "rollout_new_tokens": last.get("new_tokens"),
            "peak_gib": peak, "reward_mean": module.last_rollout_metrics.get("reward/mean"),
            "completion_mean_length": module.last_rollout_metrics.get("completions/mean_length")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--text-len", type=int, default=32, help="text tokens after the image in each prompt")
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--agree-steps", type=int, default=16)
    p.add_argument("--grpo-steps", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny config")
    p.add_argument("--profile", action="store_true", help="ours: also profile one rollout (top GPU kernels)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")
    if args.tiny and not args.child:
        args.prompts, args.generations, args.new_tokens = 2, 2, 8
        args.image_side, args.text_len, args.agree_steps = 112, 8, 4

    if args.child:
        fn = {"ours": run_ours_arm, "grpo_step": run_grpo_arm}.get(args.child, run_generate_arm)
        print("RESULT " + json.dumps(fn(args.child, args)), flush=True)
        return

    t0 = time.perf_counter()
    prepare_model_dir(args.model_dir, args.tiny)
    print(f"model dir ready in {time.perf_counter() - t0:.1f}s: {args.model_dir}", flush=True)
    results = {}
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--child", arm, "--model-dir", str(args.model_dir),
               "--prompts", str(args.prompts), "--generations", str(args.generations),
               "--new-tokens", str(args.new_tokens), "--text-len", str(args.text_len),
               "--image-side", str(args.image_side), "--agree-steps", str(args.agree_steps),
               "--grpo-steps", str(args.grpo_steps), "--out", str(args.out)] + (["--tiny"] if args.tiny else [])
        cmd += ["--profile"] if args.profile else []
        res = utils.run_child(arm, cmd)
        if "error" in res:
            results[arm] = res
            continue
        results[arm] = res
        brief = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
        print(f"[{arm}] {json.dumps(brief)}", flush=True)
        if "agreement" in res:
            print(f"[{arm}] agreement {json.dumps(res['agreement'])}", flush=True)
    report(results, args)


def report(results: dict, args) -> None:
    ref = results.get("hf_generate_lora", {}).get("tokens_per_s")
    lines = ["| arm | new tok/s | x HF generate (LoRA) | rollout s | peak GiB | notes |", "|---|---|---|---|---|---|"]

    def row(name, r, note=""):
        if "error" in r:
            lines.append(f"| {name} | failed | | | | {r['error'].strip().splitlines()[-1][:90]} |")
            return
        tps = r.get("tokens_per_s")
        ratio = f"{tps / ref:.1f}x" if (ref and tps) else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {name} | {tps:,.0f} | {ratio} | {r.get('seconds', 0):.2f} | {peak} | {note} |")

    for arm in ("hf_generate_lora", "hf_generate_merged", "ours"):
        if arm in results:
            r = results[arm]
            note = ""
            if arm == "ours" and "error" not in r:
                note = (f"{r['backend']}; prefill {r['prefill_s']:.2f}s, decode {r['decode_s']:.2f}s "
                        f"({r['steps']} steps)")
            row(arm, r, note)
            if arm == "ours" and "error" not in r:
                for sub in ("top_p_0.95", "no_cuda_graphs", "no_prefix_sharing"):
                    row(f"ours ({sub})", r[sub], r[sub]["backend"])
    table = "\n".join(lines)
    extra = []
    ours = results.get("ours", {})
    if "agreement" in ours:
        a = ours["agreement"]
        extra.append(f"Logits agreement, first {a['steps']} greedy steps, {args.prompts * args.generations} rows, "
                     f"vs HF generate with the LoRA "
                     f"active (max |dlogit| / mean / rows with identical tokens):")
        for key in ("ours_vs_hf_lora", "ours_unmerged_vs_hf_lora", "hf_merged_vs_hf_lora"):
            x = a[key]
            extra.append(f"- {key}: {x['max_abs']:.4g} / {x['mean_abs']:.3g} / {x['rows_all_tokens_equal']:.0%} "
                         f"(logit std {x['ref_logit_std']:.3g}, {x['compared_steps']} row-steps)")
        extra.append(f"- within bf16 tolerance (<= 2x the merge noise): {a['ours_within_bf16_tolerance']}")
    g = results.get("grpo_step")
    if g and "error" not in g:
        est = None
        hf = results.get("hf_generate_lora", {})
        if hf.get("seconds") and g.get("rollout_s"):
            est = g["median_step_s"] - g["rollout_s"] + hf["seconds"]
        extra.append(f"GRPO step (VisionGRPOModule, {args.prompts}x{args.generations} x {args.new_tokens} tokens, "
                     f"rollout backend {g['rollout_backend']}): {g['median_step_s']:.2f} s/step, rollout "
                     f"{g['rollout_s']:.2f} s; peak {g['peak_gib']} GiB"
                     + (f"; same step with HF generate (LoRA) as rollout ~{est:.1f} s (estimated)" if est else ""))
    elif g:
        extra.append(f"GRPO step failed: {g['error'].strip().splitlines()[-1][:200]}")
    text = table + "\n\n" + "\n".join(extra)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_step.md").write_text(text + "\n")
    cfg = {"shape": "qwen2.5-vl-7b" if not args.tiny else "tiny", "prompts": args.prompts,
           "generations": args.generations, "new_tokens": args.new_tokens, "image": f"{args.image_side}px",
           "lora_r": 16, "temperature": 1.0, "top_p": 1.0}
    rows = [utils.record("grpo_step", arm, cfg, {k: v for k, v in r.items() if k != "arm"})
            for arm, r in results.items()]
    utils.append_jsonl(args.out / "grpo_step.jsonl", rows)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
