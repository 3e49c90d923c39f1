"""FSDP smoke check on one GPU: wrapping, a few SFT steps, state gathering, checkpoint and adapter export.

What it checks (each arm in its own process, so one failure does not hide the next):
  fsdp        VisionSFTModule (LoRA, bf16) on a small random Qwen2.5-VL, VisionFSDPStrategy on 1 device,
              precision bf16-true: decoder layers become FSDP units, loss is finite, LoRA weights move,
              ``gather_full_state_dict`` returns full-shape tensors with clean names, the Lightning checkpoint
              holds exactly the trainable weights (full shapes), ``save_adapter_gathered`` writes an adapter
              that PEFT loads back with the trained values, and ``merge_lora`` merges it.
  fsdp_qlora  the same with quantization=4bit and bnb_4bit_quant_storage=bfloat16 (recipes/strategies/
              fsdp_qlora.yaml), plus the refusal without the storage dtype.
What it leaves out: more than one GPU (the CPU tests run 2 ranks with gloo: tests/distributed/test_fsdp.py), real
weights (no hub access on the GPU machine), speed.

Run by ``pytest -m cuda tests/gpu/test_gpu_checks.py``, or by hand:
  GPU:  python tests/gpu/fsdp_smoke.py --out $OUT            (~1-2 min, prints "FSDP smoke OK")
        python tests/gpu/fsdp_smoke.py --out $OUT --arms fsdp --steps 5
  CPU dry run of the logic (fp32, gloo): python tests/gpu/fsdp_smoke.py --cpu --arms fsdp --steps 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ARMS = ("fsdp", "fsdp_qlora")
# a small but not trivial Qwen2.5-VL shape: 4 decoder layers of width 512, a 4-block vision tower
SMALL_QWEN25 = {
    "text_config": {"hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
                    "num_attention_heads": 8, "num_key_value_heads": 2},
    "vision_config": {"depth": 4, "hidden_size": 256, "intermediate_size": 512, "num_heads": 4,
                      "out_hidden_size": 512, "fullatt_block_indexes": [3]},
}


def run_arm(arm: str, out: Path, steps: int, cpu: bool = False) -> dict:
    # heavy imports: only the per-arm child process needs them (the parent just starts one per arm)
    import lightning as L
    import torch
    from peft import PeftModel
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import AutoModelForImageTextToText

    from vlm_lightning.data import VisionChatDataModule
    from vlm_lightning.demo.data import make_demo_ocr_dataset
    from vlm_lightning.distributed.checks import validate_strategy_for_quantization
    from vlm_lightning.distributed.gather import gather_full_state_dict, save_adapter_gathered
    from vlm_lightning.distributed.strategies import VisionFSDPStrategy
    from vlm_lightning.export.merge import merge_lora
    from vlm_lightning.models.tiny import make_tiny_vlm
    from vlm_lightning.modules.sft import VisionSFTModule

    assert cpu or torch.cuda.is_available(), "fsdp_smoke.py needs a CUDA GPU (--cpu: a dry run of the logic)"
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        make_tiny_vlm("qwen2_5_vl", model_dir, seed=0, **SMALL_QWEN25)
    data = make_demo_ocr_dataset(out / "data", n_train=16, n_val=4)
    qlora = arm == "fsdp_qlora"
    if qlora:  # the refusal first: no storage dtype -> a clear error before anything loads
        try:
            validate_strategy_for_quantization("fsdp", "4bit", None, "bfloat16")
            raise AssertionError("FSDP + 4-bit without bnb_4bit_quant_storage was accepted")
        except ValueError as err:
            print(f"[{arm}] refused as expected: {str(err)[:120]}...")
    module = VisionSFTModule(str(model_dir), dtype="float32" if cpu else "bfloat16", r=8, lora_alpha=16,
                             quantization="4bit" if qlora else None,
                             bnb_4bit_quant_storage=("float32" if cpu else "bfloat16") if qlora else None,
                             gradient_checkpointing=True,
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    dm = VisionChatDataModule(str(model_dir), train=str(data["train"]), batch_size=2)
    strategy = VisionFSDPStrategy()
    trainer = L.Trainer(accelerator="cpu" if cpu else "gpu", devices=1, strategy=strategy,
                        precision="32-true" if cpu else "bf16-true", max_steps=steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(out / arm))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - t0

    units = sorted({type(m.module).__name__ for m in trainer.strategy.model.modules()
                    if isinstance(m, FSDP) and m is not trainer.strategy.model})
    assert units == ["Qwen2_5_VLDecoderLayer"], units
    loss = float(trainer.callback_metrics["train/loss"])
    assert loss == loss and loss < 1e4, f"loss {loss}"

    full = gather_full_state_dict(trainer, module, trainable_only=True)
    assert full and all("lora_" in k and "_fsdp_wrapped_module" not in k for k in full), list(full)[:3]
    r = module.hparams.r
    assert all(r in v.shape for v in full.values()), "gathered LoRA tensors are not full shape"
    moved = [k for k, v in full.items() if "lora_B" in k and v.abs().sum() > 0]
    assert moved, "no lora_B moved from zero"

    ckpt = out / arm / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert sorted(sd) == sorted(f"model.{k}" for k in full), "checkpoint keys != trainable weights"
    assert all(torch.equal(sd[f"model.{k}"].float(), v.float()) for k, v in full.items())

    adapter = save_adapter_gathered(trainer, module, out / arm / "adapter")
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16)
    loaded = dict(PeftModel.from_pretrained(base, adapter).named_parameters())
    assert all(torch.equal(loaded[k].float().cpu(), v.float()) for k, v in full.items()), "adapter != gathered"
    merged = str(merge_lora(adapter, out / arm / "merged", base_name_or_path=str(model_dir)))
    peak = torch.cuda.max_memory_allocated() / 2**20 if not cpu else 0.0
    return {"arm": arm, "fsdp_units": units, "loss": loss, "fit_s": round(fit_s, 1), "lora_tensors": len(full),
            "peak_mib": round(peak), "adapter": str(adapter), "merged": merged}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fsdp_smoke")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--cpu", action="store_true", help="dry run of the script's logic on the CPU (fsdp arm)")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.arm:
        print("RESULT " + json.dumps(run_arm(args.arm, out, args.steps, cpu=args.cpu)))
        return
    results, failed = [], []
    for arm in args.arms.split(","):
        cmd = [sys.executable, __file__, "--out", str(out), "--steps", str(args.steps), "--arm", arm]
        proc = subprocess.run(cmd + (["--cpu"] if args.cpu else []), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            results.append(json.loads(lines[-1][7:]))
            print(f"[{arm}] ok: {results[-1]}")
        else:
            failed.append(arm)
            print(f"[{arm}] FAILED ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    (out / "fsdp_smoke.json").write_text(json.dumps({"results": results, "failed": failed}, indent=2))
    if failed:
        sys.exit(f"FSDP smoke FAILED: {failed}")
    print("FSDP smoke OK")


if __name__ == "__main__":
    main()
