"""A few training steps of VisionSFTModule / VisionGRPOModule under a multi-process strategy, dumping each
rank's view to files that a test compares (``tests/distributed/test_ddp.py``, ``test_fsdp.py``).

Run as a script so that Lightning's subprocess launcher can start the other ranks (it re-runs
``python -m tests.distributed.ddp_worker <same args>`` with ``LOCAL_RANK`` set):

    python -m tests.distributed.ddp_worker --module sft --model runs/tiny/qwen2_vl --out /tmp/ddp \
        --strategy ddp --devices 2 --steps 3 --text-only-rank 1 --finetune-vision

Every rank writes ``<out>/rank<r>.pt``: ``{"rank", "world_size", "grad_norms": [{name: float | None}] per
optimizer step (gradients as the optimizer sees them, after the all-reduce), "weights": {name: tensor}
(trainable weights after the steps, gathered), "initial": {...} (before), "had_images": [bool] per step,
"find_unused_parameters": bool | None, "fsdp_units": [class names wrapped], "metrics": {...}}``.
Deliberately left out: anything a GPU would add (mixed precision, NCCL); this is the CPU/gloo check.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader

from vlm_lightning.distributed.gather import (
    clean_parameter_name,
    gather_full_state_dict,
    run_unsharded,
    save_adapter_gathered,
)
from vlm_lightning.distributed.strategies import VisionDDPStrategy, VisionFSDPStrategy, batch_has_images


def _image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def _rows(with_images: bool, n: int, offset: int) -> list[dict]:
    from vlm_lightning.data.formats import normalize_row

    rows = []
    for i in range(n):
        user = ([{"type": "image", "image": _image(offset + i)}] if with_images else []) + \
            [{"type": "text", "text": f"Read the digits {i}."}]
        rows.append(normalize_row({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": f"{(offset + i) * 7919 % 100000:05d}"},
        ]}, offset + i))
    return rows


class RankSplitData(L.LightningDataModule):
    """Rank ``text_only_rank`` gets rows without any image; every other rank gets image rows."""

    def __init__(self, model_dir: str, batch_size: int, steps: int, text_only_rank: int, for_generation: bool):
        super().__init__()
        self.model_dir, self.batch_size, self.steps = model_dir, batch_size, steps
        self.text_only_rank, self.for_generation = text_only_rank, for_generation

    def train_dataloader(self):
        from transformers import AutoProcessor

        from vlm_lightning.data import VisionChatCollator

        rank = self.trainer.global_rank
        processor = AutoProcessor.from_pretrained(self.model_dir)
        rows = _rows(rank != self.text_only_rank, self.batch_size * self.steps, offset=100 * rank)
        collator = VisionChatCollator(processor, for_generation=self.for_generation)
        return DataLoader(rows, batch_size=self.batch_size, shuffle=False, collate_fn=collator)


class Recorder(L.Callback):
    """Gradient norms per trainable parameter right before each optimizer step (after DDP's all-reduce)."""

    def __init__(self):
        self.grad_norms: list[dict[str, float | None]] = []
        self.had_images: list[bool] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.wrapping: dict = {}

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = trainer.strategy.model  # DDP unwraps at teardown: record while wrapped
        self.wrapping = {"find_unused_parameters": getattr(wrapped, "find_unused_parameters", None),
                         "fsdp_units": sorted({type(m.module).__name__ for m in wrapped.modules()
                                               if isinstance(m, FSDP) and m is not wrapped})}
        self.initial = gather_full_state_dict(trainer, pl_module, trainable_only=True, rank0_only=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.had_images.append(batch_has_images(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = {}
        for name, p in pl_module.model.named_parameters():
            if p.requires_grad:
                # FSDP (use_orig_params): a rank's grad is its shard, possibly empty; the test sums squares
                norms[clean_parameter_name(name)] = None if p.grad is None else float(p.grad.float().pow(2).sum())
        self.grad_norms.append(norms)


def reward_digits(prompts, completions, **columns) -> list[float]:
    """A deterministic reward with spread: the fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) + 0.01 * (len(c) % 5) for c in completions]


def build_module(args):
    if args.module == "sft":
        from vlm_lightning.modules.sft import VisionSFTModule

        return VisionSFTModule(args.model, dtype="float32", r=4, lora_alpha=8,
                               gradient_checkpointing=args.gradient_checkpointing,
                               finetune_vision_layers=args.finetune_vision,
                               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    from vlm_lightning.modules.grpo import VisionGRPOModule

    return VisionGRPOModule(args.model, reward_funcs=[reward_digits], dtype="float32", r=4, lora_alpha=8,
                            finetune_vision_layers=args.finetune_vision,
                            gradient_checkpointing=args.gradient_checkpointing,
                            num_generations=4, max_new_tokens=6, temperature=1.0, loss_type="dapo", beta=0.0,
                            log_completions=0, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))


def build_strategy(args):
    if args.strategy == "ddp":
        return VisionDDPStrategy(process_group_backend="gloo")
    if args.strategy == "fsdp":
        return VisionFSDPStrategy(process_group_backend="gloo", wrap_vision_blocks=args.wrap_vision_blocks,
                                  sharding_strategy=args.sharding_strategy)
    return args.strategy  # a name in Lightning's StrategyRegistry, e.g. "vision_deepspeed_stage_2"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--module", choices=("sft", "grpo"), default="sft")
    p.add_argument("--model", required=True, help="tiny model directory (make_tiny_vlm)")
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--text-only-rank", type=int, default=1, help="-1: every rank gets images")
    p.add_argument("--finetune-vision", action="store_true", help="LoRA on the vision tower too")
    p.add_argument("--wrap-vision-blocks", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--sharding-strategy", default="FULL_SHARD")
    p.add_argument("--save-adapter", action="store_true", help="save_adapter_gathered to <out>/adapter")
    p.add_argument("--save-checkpoint", action="store_true", help="trainer.save_checkpoint(<out>/last.ckpt)")
    p.add_argument("--check-generate", action="store_true",
                   help="after fit, greedy-generate on one prompt batch through run_unsharded")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # 2 processes on a shared 2-core CI machine
    L.seed_everything(0, workers=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    module = build_module(args)
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy=build_strategy(args),
                        max_steps=args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[recorder], num_sanity_val_steps=0, limit_val_batches=0)
    data = RankSplitData(args.model, args.batch_size, args.steps, args.text_only_rank,
                         for_generation=args.module == "grpo")
    trainer.fit(module, datamodule=data)

    try:
        weights = gather_full_state_dict(trainer, module, trainable_only=True, rank0_only=False)
    except Exception:  # keep what the steps recorded, for the test's failure message
        torch.save({"rank": trainer.global_rank, "grad_norms": recorder.grad_norms},
                   out / f"rank{trainer.global_rank}.pt")
        raise
    result = {
        "rank": trainer.global_rank, "world_size": trainer.world_size, "grad_norms": recorder.grad_norms,
        "had_images": recorder.had_images, "initial": recorder.initial, "weights": weights,
        **recorder.wrapping,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1},
        "gathered_rank0": sorted(gather_full_state_dict(trainer, module, trainable_only=True)),
        "env_local_rank": os.environ.get("LOCAL_RANK"),
    }
    if args.save_checkpoint:  # a collective under FSDP: every rank calls it, rank 0 writes
        trainer.save_checkpoint(out / "last.ckpt")
    if args.check_generate:  # model calls from outside a step (as callbacks make them), same inputs on every rank
        from transformers import AutoProcessor

        from vlm_lightning.data import VisionChatCollator

        processor = AutoProcessor.from_pretrained(args.model)
        module.eval()
        prompts = VisionChatCollator(processor, for_generation=True)(_rows(True, 2, offset=7))
        result["generated"] = run_unsharded(trainer, module, "generate", prompts, max_new_tokens=4)
        batch = VisionChatCollator(processor)(_rows(True, 2, offset=7))
        with torch.no_grad():
            loss, _ = run_unsharded(trainer, module, "normalized_loss", batch, torch.tensor(1.0))
        result["unsharded_loss_sum"] = float(loss)
        # for the record: the same call made directly fails under FSDP (the root unit's embedding is a shard:
        # "Padding_idx must be within num_embeddings"), which is why callbacks need run_unsharded
        try:
            with torch.no_grad():
                result["direct_loss_sum"] = float(module.normalized_loss(batch, torch.tensor(1.0))[0])
            result["direct_error"] = None
        except Exception as err:  # noqa: BLE001
            result["direct_error"] = f"{type(err).__name__}: {str(err)[:200]}"
    if args.save_adapter:
        save_adapter_gathered(trainer, module, out / "adapter")
    torch.save(result, out / f"rank{trainer.global_rank}.pt")
    (out / f"rank{trainer.global_rank}.done").write_text(json.dumps({"steps": len(recorder.grad_norms)}))


if __name__ == "__main__":
    main()
