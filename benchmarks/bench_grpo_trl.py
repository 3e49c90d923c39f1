"""TRL side by side: one GRPO optimizer step of TRL's ``GRPOTrainer`` (HF ``generate`` rollout, no vLLM) on the same
shape, prompts, reward, G and lengths as ``bench_grpo_step.py``'s ``dapo_b0_it1`` config.

Shape: Qwen2.5-VL-7B (real config, random bf16 weights: the folder ``bench_sft_step.prepare_model_dir`` writes, with
the fixture processor beside it), LoRA r=16 alpha 16 on every language-model linear (``utils.LANGUAGE_LINEARS``),
8 prompts x 8 generations (``num_generations=8``, 64 completions a step) x 256 new tokens, one 448x448 PIL image a
prompt (256 image tokens: the processor's max_pixels is raised to Qwen2.5-VL's own 12845056, the fixture's would shrink
it to 224px), prompt ``i`` 306 - 2i tokens long (ours: 306, row i left padded 2i), temperature 1.0, top-p 1.0,
loss_type "dapo", beta 0, num_iterations 1, the id-length reward ``(len(completion_ids) % 7) / 7``, bf16 (TRL's
``bf16=True`` autocast on bf16 weights), gradient checkpointing (non-reentrant), AdamW lr 1e-4, max_grad_norm 1.
Batch mapping: per_device_train_batch_size x gradient_accumulation_steps = 64 (``--micro-batch``, default 16 -> 4
micro-batches), steps_per_generation = the accumulation steps, so TRL generates the 64 completions in one
``generate`` call per optimizer step (as ours), then runs the loss over 4 micro-batches.
``generation_kwargs={"min_new_tokens": 256}`` (``--no-min-tokens`` drops it): every completion is 256 tokens even if
the random weights sample an EOS; ours does not force it (its result line gives ``rollout_new_tokens``, 16384 when
no row stopped early).

Printed: the median optimizer-step time over the steps after the first (warm-up), timed by a TrainerCallback from
``on_step_begin`` to ``on_step_end`` with ``torch.cuda.synchronize`` (rollout + reward + loss/backward of every
micro-batch + clip + AdamW), the median ``generate`` time inside it (TRL's ``_generate_single_turn``, synchronised),
the completion tokens a step, and the peak GPU memory allocated over the timed steps.
Left out: the data loader's fetch of the next 64 rows (HF Trainer fetches them before ``on_step_begin``), logging
after ``on_step_end``, vLLM and TRL's continuous batching, multi-GPU, real data. It is TRL's default HF path, not tuned.

Wheels (an offline GPU image without trl/datasets): ``bash benchmarks/wheels_trl.sh`` where an index is reachable,
carry .whl_trl/, and install there into a folder whose path holds "site-packages" (datasets' dill pickles modules
from any other path by value, and fails on pyarrow):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_trl/site-packages .whl_trl/*.whl
Run (GPU):   PYTHONPATH=/tmp/site_trl/site-packages:$PYTHONPATH python3 benchmarks/bench_grpo_trl.py --out $OUT
             (writes grpo_trl.md, appends grpo_trl.jsonl; --micro-batch 64 / 8 for other batch mappings)
Smoke (CPU): PYTHONPATH=/tmp/trl_site python benchmarks/bench_grpo_trl.py --tiny --out /tmp/trl_out
             (trl alone in /tmp/trl_site, the rest from the venv; tiny model, 2 prompts x 2 generations x 8 tokens,
             112px image, fp32, micro-batch 2 x 2 accumulation steps)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import utils
from bench_sft_step import add_processor, prepare_model_dir

QWEN25_MAX_PIXELS = 12845056  # Qwen2.5-VL's processor: min_pixels 3136, max_pixels 12845056


def build_prompts(processor, n: int, image_side: int, prompt_len: int, seed: int = 0) -> tuple[list, list[int]]:
    """n rows {"prompt": conversational messages, "image": PIL}; prompt i is ``prompt_len - 2i`` tokens (min 0 text)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    tok = processor.tokenizer

    def length(t: str, img) -> int:  # the prompt's tokens as TRL builds them (chat template, image expanded)
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}]
        chat = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return len(processor(text=[chat], images=[img], return_tensors="pt")["input_ids"][0])

    rows, lens = [], []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8))
        text = "".join(rng.choice(letters, 4 * prompt_len))
        target = prompt_len - min(2 * i, 14)
        n_text = max(target - length("", img), 0)
        cut = tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n_text])
        while length(cut, img) > target and cut:  # BPE may re-merge the decoded text differently: trim to fit
            cut = cut[:-1]
        rows.append({"prompt": [{"role": "user", "content": cut}], "image": img})
        lens.append(length(cut, img))
    return rows, lens


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    processor = AutoProcessor.from_pretrained(args.model_dir)
    ip = processor.image_processor
    ip.size = {"shortest_edge": 3136, "longest_edge": QWEN25_MAX_PIXELS}
    for attr, value in (("min_pixels", 3136), ("max_pixels", QWEN25_MAX_PIXELS)):
        if hasattr(ip, attr):
            setattr(ip, attr, value)
    rows, prompt_lens = build_prompts(processor, args.prompts, args.image_side, args.prompt_len)
    grid = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[rows[0]["image"]],
                     return_tensors="pt")["image_grid_thw"][0].tolist()
    dataset = Dataset.from_list(rows)

    completion_tokens: list[int] = []

    def id_length_reward(prompts, completions, completion_ids=None, **kw):
        completion_tokens.append(sum(len(ids) for ids in completion_ids))
        return [(len(ids) % 7) / 7.0 for ids in completion_ids]

    total = args.prompts * args.generations
    if total % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide {args.prompts} x {args.generations}")
    accum = total // args.micro_batch
    out_dir = tempfile.mkdtemp(prefix="grpo_trl_")
    config = GRPOConfig(
        output_dir=out_dir, max_steps=args.steps, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=accum, steps_per_generation=accum, num_generations=args.generations,
        max_completion_length=args.new_tokens, temperature=1.0, top_p=1.0, loss_type="dapo", beta=0.0,
        num_iterations=1, learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=1.0, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, use_vllm=False, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, log_completions=False,
        dataloader_num_workers=0, generation_kwargs={"min_new_tokens": args.new_tokens} if args.min_tokens else None)

    model = AutoModelForImageTextToText.from_pretrained(args.model_dir, dtype=dtype,
                                                        device_map={"": "cuda" if cuda else "cpu"})
    peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=utils.LANGUAGE_LINEARS,
                             task_type="CAUSAL_LM")
    steps: list[dict] = []
    gen_s: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if len(steps) == 1 and cuda:  # peak over the timed steps, as bench_grpo_step.py
                torch.cuda.reset_peak_memory_stats()
            self.n_tok, self.n_gen = len(completion_tokens), len(gen_s)
            utils.sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            utils.sync()
            steps.append({"step_s": time.perf_counter() - self.t0,
                          "completion_tokens": sum(completion_tokens[self.n_tok:]),
                          "generate_s": sum(gen_s[self.n_gen:])})

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):  # TRL 1.16's HF-generate call (private): synchronised timing
            utils.sync()
            t0 = time.perf_counter()
            out = super()._generate_single_turn(*a, **kw)
            utils.sync()
            gen_s.append(time.perf_counter() - t0)
            return out

    torch.manual_seed(1)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=[id_length_reward], args=config, train_dataset=dataset,
                               processing_class=processor, peft_config=peft_config, callbacks=[StepTimer()])
    n_lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n and p.requires_grad)
    lora_dtype = next(str(p.dtype) for n, p in trainer.model.named_parameters() if "lora_" in n)
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)  # save_strategy "no": nothing kept there
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    warm = steps[1:] or steps
    med_gen = statistics.median(s["generate_s"] for s in warm)
    med_tok = statistics.median(s["completion_tokens"] for s in warm)
    return {"median_step_s": statistics.median(s["step_s"] for s in warm), "median_generate_s": med_gen,
            "completion_tokens": med_tok, "generate_tokens_per_s": med_tok / med_gen if med_gen else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "steps": steps,
            "losses": losses, "prompt_lens": prompt_lens, "image_grid_thw": grid, "micro_batch": args.micro_batch,
            "grad_accum": accum, "n_lora": n_lora, "lora_dtype": lora_dtype, "min_new_tokens": args.min_tokens,
            "packages": package_versions()}


def package_versions() -> dict:
    out = {}
    for name in ("trl", "datasets", "accelerate", "pyarrow", "pandas"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
            out[name] = None
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--text-len", type=int, default=32, help="as bench_grpo_step.py: prompt = 16 + image + text-len")
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--micro-batch", type=int, default=16, help="per_device_train_batch_size (divides P x G)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is the warm-up)")
    p.add_argument("--no-min-tokens", dest="min_tokens", action="store_false",
                   help="let generate stop at EOS (default: min_new_tokens = --new-tokens)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny config")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")
    if args.tiny and not args.child:
        args.prompts, args.generations, args.new_tokens, args.image_side, args.text_len = 2, 2, 8, 112, 8
        args.steps, args.micro_batch = 3, 2
    n_img = (args.image_side // 14) ** 2 // 4
    args.prompt_len = 16 + n_img + 2 + args.text_len  # bench_grpo_rollout.prompt_batch's length
    if args.child:
        print("RESULT " + json.dumps(run_trl(args)), flush=True)
        return

    prepare_model_dir(args.model_dir, args.tiny)
    add_processor(args.model_dir)
    cmd = [sys.executable, __file__, "--child", "--model-dir", str(args.model_dir)]
    for flag in ("prompts", "generations", "new_tokens", "text_len", "image_side", "micro_batch", "steps"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += [] if args.min_tokens else ["--no-min-tokens"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        print(f"[trl_grpo] FAILED rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}", flush=True)
        res = {"error": r.stderr[-1500:] or r.stdout[-1500:]}
    else:
        res = json.loads(line[-1][7:])
        res["wall_s"] = time.perf_counter() - t0
        print(f"[trl_grpo] {json.dumps({k: v for k, v in res.items() if k not in ('steps', 'losses')})}", flush=True)
    report(res, args)
    if "error" in res:
        sys.exit(1)


def report(r: dict, args) -> None:
    lines = [f"TRL GRPOTrainer step (HF generate), {'tiny' if args.tiny else 'Qwen2.5-VL-7B shape'}: {args.prompts} "
             f"prompts x {args.generations} generations x {args.new_tokens} new tokens, {args.image_side}px image, "
             f"LoRA r=16, dapo, beta 0, num_iterations 1", "",
             "| arm | full step (median s) | generate (median s) | generate new tok/s | completion tokens | peak GiB "
             "| micro-batch x accum |", "|---|---|---|---|---|---|---|"]
    if "error" in r:
        last = r["error"].strip().splitlines()[-1][:100] if r["error"].strip() else ""
        lines.append(f"| trl_grpo | failed: {last} |")
    else:
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        tps = f"{r['generate_tokens_per_s']:,.0f}" if r.get("generate_tokens_per_s") else "-"
        lines.append(f"| trl_grpo | {r['median_step_s']:.2f} | {r['median_generate_s']:.2f} | {tps} | "
                     f"{r['completion_tokens']:.0f} | {peak} | {r['micro_batch']} x {r['grad_accum']} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grpo_trl.md").write_text(text + "\n")
    cfg = {"shape": "tiny" if args.tiny else "qwen2.5-vl-7b", "prompts": args.prompts,
           "generations": args.generations, "new_tokens": args.new_tokens, "image": f"{args.image_side}px",
           "prompt_len": args.prompt_len, "lora_r": 16, "loss_type": "dapo", "beta": 0.0, "num_iterations": 1,
           "micro_batch": args.micro_batch, "min_new_tokens": args.min_tokens, "checkpointing": True}
    utils.append_jsonl(args.out / "grpo_trl.jsonl", [utils.record("grpo_trl_step", "trl_grpo_hf_generate", cfg, r)])


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
