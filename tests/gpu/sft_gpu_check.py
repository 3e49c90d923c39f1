"""GPU check of the SFT spine: a 16-bit LoRA and a 4-bit QLoRA run of VisionSFTModule under the Lightning
Trainer (precision="bf16-true") on a Qwen2.5-VL-7B-shaped model (its real config, random weights), a few
steps on one repeated batch. Asserts what must hold and records what it measured:

  * the loss is finite and falls (the batch repeats, so the adapters can fit it);
  * QLoRA: exactly the language model's linears are bitsandbytes Linear4bit (vision tower, projector and
    lm_head stay bf16), LoRA weights are bf16, no frozen weight was upcast to fp32;
  * LoRA B matrices moved away from zero; frozen base weights did not change;
  * step time (median after the first step) and peak GPU memory per arm.

What it leaves out: real data and real weights (no hub on the GPU machine), speed comparisons against other
stacks (benchmarks/bench_sft_step.py does those; this check shares its model folder and utils.py's batch).

Run by ``pytest -m cuda tests/gpu/test_gpu_checks.py``, or by hand:
  GPU:   python tests/gpu/sft_gpu_check.py --out $OUT      (~2-3 min on one H200 incl. building the model)
  Smoke (CPU): python tests/gpu/sft_gpu_check.py --tiny --steps 3
Writes one JSON line per arm to --jsonl (default $OUT/sft_gpu_check.jsonl), prints a table, and exits 1 when a
check fails.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

from vlm_lightning.models import get_family_spec
from vlm_lightning.modules import VisionSFTModule

# benchmarks/ holds the Qwen2.5-VL-7B config, the synthetic batch and the result records (utils.py), and the
# random-weight model folder this check shares with the SFT benchmark (bench_sft_step.py)
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import utils  # noqa: E402
from bench_sft_step import add_processor, prepare_model_dir  # noqa: E402


def run_arm(arm: str, args) -> dict:
    cuda = torch.cuda.is_available()
    quant = "4bit" if arm == "qlora" else None
    module = VisionSFTModule(str(args.model_dir), quantization=quant, dtype="bfloat16" if cuda else "float32",
                             r=16, lora_alpha=32, gradient_checkpointing=True,
                             optimizer=lambda p: torch.optim.AdamW(p, lr=args.lr))
    config = utils.build_config(tiny=args.tiny)
    batch = utils.synthetic_vlm_batch(config, args.batch, args.seq_len, image_side=args.image_side, seed=0)

    class Repeat(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(args.steps):
                yield batch

    times, losses = [], []

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.base = {n: p.detach().clone() for n, p in pl_module.model.named_parameters()
                         if not p.requires_grad and p.dtype in (torch.bfloat16, torch.float32)
                         and ".layers.0." in n}
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)
            losses.append(float(trainer.callback_metrics["train/loss"]))

    probe = Probe()
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-true" if cuda else "32-true",
                        max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[probe])
    t_fit = time.perf_counter()
    trainer.fit(module, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    fit_s = time.perf_counter() - t_fit

    model = module.model
    spec = get_family_spec(model)
    checks = {"finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
              "loss_falls": losses[-1] < losses[0]}
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    checks["lora_B_moved"] = all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    checks["lora_dtype"] = str({p.dtype for p in lora.values()})
    params = dict(model.named_parameters())
    checks["base_unchanged"] = all(torch.equal(v, params[n]) for n, v in probe.base.items())
    if quant:
        import bitsandbytes as bnb  # optional dependency: only the QLoRA arm needs it

        hf = module.hf_model
        four = {n for n, m in hf.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
        lm_linears = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)
                      and n.startswith(spec.language_model + ".") and ".lora_" not in n}  # PEFT: <name>.base_layer
        checks["linear4bit_exactly_language_model"] = four == lm_linears and len(four) > 0
        checks["n_linear4bit"] = len(four)
        if cuda:  # the CPU smoke test runs in fp32 on purpose
            checks["no_fp32_frozen"] = not any(p.dtype == torch.float32 for p in hf.parameters() if not p.requires_grad)
    ok = all(v for k, v in checks.items() if isinstance(v, bool))
    steady = times[1:] or times
    result = {"arm": arm, "ok": ok, "checks": checks, "losses": [round(x, 4) for x in losses],
              "step_s_median": statistics.median(steady), "fit_s": fit_s,
              "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
              "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    del trainer, module, model, lora, params, probe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arms", default="lora,qlora")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--image-side", type=int, default=448)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny config of the same architecture")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    p.add_argument("--jsonl", type=Path, default=None)
    args = p.parse_args()
    if args.model_dir is None:
        args.model_dir = Path("/tmp/vlm_bench") / ("qwen25vl_tiny" if args.tiny else "qwen25vl_7b")
    if args.tiny:
        args.image_side = min(args.image_side, 56)
        args.seq_len = min(args.seq_len, 64)
    t0 = time.perf_counter()
    prepare_model_dir(args.model_dir, args.tiny)
    add_processor(args.model_dir)
    print(f"model dir ready in {time.perf_counter() - t0:.1f}s: {args.model_dir}", flush=True)
    rows = []
    for arm in args.arms.split(","):
        res = run_arm(arm, args)
        cfg = {"shape": "tiny" if args.tiny else "Qwen2.5-VL-7B", "batch": args.batch, "seq_len": args.seq_len,
               "image_side": args.image_side, "steps": args.steps, "lr": args.lr, "r": 16,
               "precision": "bf16-true", "gradient_checkpointing": True}
        rows.append(utils.record("sft_gpu_check", arm, cfg, res))
        print(json.dumps(res), flush=True)
    jsonl = args.jsonl or args.out / "sft_gpu_check.jsonl"
    utils.append_jsonl(jsonl, rows)
    print(f"\n{'arm':6} {'ok':5} {'step s':>8} {'peak GiB':>9}  loss first -> last")
    for r in rows:
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        print(f"{r['arm']:6} {str(r['ok']):5} {r['step_s_median']:8.3f} {mem:>9}  "
              f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}")
    print(f"wrote {jsonl}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
