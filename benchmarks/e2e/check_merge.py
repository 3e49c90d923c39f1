"""Per-tensor check of a merged model against its 16-bit base and the LoRA weights of the training checkpoint.

    python benchmarks/e2e/check_merge.py --base <base> --merged <merged> --ckpt <run>/checkpoints/last.ckpt

* every LoRA-targeted weight: merged == base + scaling * B @ A (A, B from the checkpoint's state dict,
  scaling = lora_alpha / r, or / sqrt(r) with rsLoRA), elementwise within the two bf16 roundings of a
  merge (delta rounded, then the sum): |merged - exact| <= 2^-8 * (|delta| + |exact|). Because a random
  base has |W| ~ 0.02 and 20 steps of LoRA move it by less than one bf16 ulp in most places, the check
  also requires the merge to have done something measurable: mean |merged - exact| below mean
  |base - exact| (a merge that silently skipped the adapter fails here), and it reports the fraction of
  elements that changed.
* every other tensor: bit-identical to the base (same dtype, shape and bytes); no tensor missing or extra.
* config.json: ``architectures`` is the base's (the stock transformers class, not a patched ``Fused*``).

Prints ``RESULT {...}`` and appends it to ``--jsonl``; exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from vlm_lightning.export.checkpoint import is_deepspeed_checkpoint, read_export_info

LORA_PREFIXES = ("model.base_model.model.", "_forward_module.model.base_model.model.")


class Tensors:
    """Every tensor of a (sharded) safetensors folder, read lazily."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.where: dict[str, object] = {}
        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        for f in files:
            h = safe_open(str(f), framework="pt")
            for k in h.keys():
                self.where[k] = h

    def keys(self) -> set[str]:
        return set(self.where)

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def load_lora(ckpt_path: Path) -> tuple[dict, dict, dict]:
    """({module path: {"A": tensor, "B": tensor}}, peft config dict, info) from a Lightning checkpoint file."""
    if is_deepspeed_checkpoint(ckpt_path):  # a folder of ZeRO shards: consolidated as the export does it
        info, state = read_export_info(ckpt_path)
        ckpt = {"state_dict": state, "vlm_lightning": info}
    else:
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
    sd = ckpt.get("state_dict") or ckpt.get("module") or {}
    info = ckpt.get("vlm_lightning") or {}
    peft_cfg = dict(info.get("peft_config") or {})
    if not peft_cfg:  # fall back on the hyper-parameters the module saved
        hp = ckpt.get("hyper_parameters") or {}
        peft_cfg = {"r": hp.get("r", 16), "lora_alpha": hp.get("lora_alpha", 16),
                    "use_rslora": hp.get("use_rslora", False)}
    lora: dict[str, dict] = {}
    for key, value in sd.items():
        for prefix in LORA_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        for part in ("A", "B"):
            tag = f".lora_{part}.default.weight"
            if key.endswith(tag):
                lora.setdefault(key[: -len(tag)], {})[part] = value.detach()
    other = [k for k in sd if "lora_" not in k]
    return lora, peft_cfg, {"ckpt_keys": len(sd), "non_lora_keys": other[:5], "n_non_lora": len(other)}


def scaling_for(module: str, cfg: dict) -> float:
    r, alpha = cfg.get("r", 16), cfg.get("lora_alpha", 16)
    for pattern, value in (cfg.get("rank_pattern") or {}).items():
        if module.endswith(pattern) or pattern in module:
            r = value
    for pattern, value in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(pattern) or pattern in module:
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def saved_key(module: str, keys: set[str]) -> str | None:
    """The safetensors key of ``<module>.weight`` (in-memory names, or the legacy Qwen-VL layout)."""
    candidates = [f"{module}.weight"]
    if module.startswith("model.language_model."):
        candidates.append("model." + module[len("model.language_model."):] + ".weight")
    if module.startswith("model.visual."):
        candidates.append("visual." + module[len("model.visual."):] + ".weight")
    return next((c for c in candidates if c in keys), None)


def check(base_dir: Path, merged_dir: Path, ckpt: Path, device: str) -> dict:
    t0 = time.perf_counter()
    base, merged = Tensors(base_dir), Tensors(merged_dir)
    lora, cfg, info = load_lora(ckpt)
    bkeys, mkeys = base.keys(), merged.keys()
    failures: list[str] = []
    if bkeys != mkeys:
        failures.append(f"key sets differ: missing in merged {sorted(bkeys - mkeys)[:5]}, "
                        f"extra in merged {sorted(mkeys - bkeys)[:5]}")
    targeted: dict[str, str] = {}
    for module, ab in lora.items():
        if set(ab) != {"A", "B"}:
            failures.append(f"{module}: checkpoint has only lora_{''.join(ab)}")
            continue
        key = saved_key(module, bkeys)
        if key is None:
            failures.append(f"{module}: no base tensor for this LoRA target")
            continue
        targeted[key] = module
    if not lora:
        failures.append(f"no LoRA tensors in {ckpt}")

    worst_ratio, max_err, sum_err, sum_base_err, n_el, n_changed, n_bad = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    per_module_bad: list[str] = []
    for key, module in sorted(targeted.items()):
        if key not in mkeys:
            continue
        w = base.get(key).to(device)
        m = merged.get(key).to(device)
        if m.dtype != w.dtype or m.shape != w.shape:
            failures.append(f"{key}: merged {m.dtype}{tuple(m.shape)} vs base {w.dtype}{tuple(w.shape)}")
            continue
        a = lora[module]["A"].to(device, torch.float32)
        b = lora[module]["B"].to(device, torch.float32)
        delta = scaling_for(module, cfg) * (b @ a)
        exact = w.float() + delta
        err = (m.float() - exact).abs()
        bound = 2.0 ** -8 * (delta.abs() + exact.abs()) * 1.001 + 1e-30
        bad = int((err > bound).sum())
        n_bad += bad
        if bad:
            per_module_bad.append(f"{key}: {bad} elements past the bf16 bound, max err {float(err.max()):.3g}")
        worst_ratio = max(worst_ratio, float((err / bound).max()))
        max_err = max(max_err, float(err.max()))
        sum_err += float(err.double().sum())
        sum_base_err += float((w.float() - exact).abs().double().sum())
        n_changed += int((m != w).sum())
        n_el += m.numel()
    if per_module_bad:
        failures.extend(per_module_bad[:5])
    mean_err = sum_err / max(n_el, 1)
    mean_base_err = sum_base_err / max(n_el, 1)
    if n_el and not mean_err < mean_base_err:
        failures.append(f"merge had no measurable effect: mean |merged-exact| {mean_err:.3g} >= "
                        f"mean |base-exact| {mean_base_err:.3g}")

    n_other, other_bad = 0, []
    for key in sorted(bkeys & mkeys):
        if key in targeted:
            continue
        n_other += 1
        w, m = base.get(key), merged.get(key)
        # bit-identical means the bytes (torch.equal would take -0.0 == 0.0 and fail on NaN)
        if w.dtype != m.dtype or w.shape != m.shape or not torch.equal(
                w.contiguous().reshape(-1).view(torch.uint8), m.contiguous().reshape(-1).view(torch.uint8)):
            other_bad.append(key)
    if other_bad:
        failures.append(f"{len(other_bad)} non-LoRA tensors differ from the base, e.g. {other_bad[:5]}")

    bcfg = json.loads((base_dir / "config.json").read_text())
    mcfg = json.loads((merged_dir / "config.json").read_text())
    if mcfg.get("architectures") != bcfg.get("architectures"):
        failures.append(f"config.architectures {mcfg.get('architectures')} != base {bcfg.get('architectures')}")
    for stray in ("quantization_config",):
        if stray in mcfg:
            failures.append(f"merged config.json still has {stray}")
    return {
        "ok": not failures, "failures": failures, "lora_targets": len(targeted), "lora_modules_in_ckpt": len(lora),
        "other_tensors": n_other, "other_not_identical": len(other_bad), "elements_checked": n_el,
        "elements_past_bound": n_bad, "worst_err_over_bound": round(worst_ratio, 4), "max_abs_err": max_err,
        "mean_abs_err_merged": mean_err, "mean_abs_err_if_unmerged": mean_base_err,
        "changed_fraction": round(n_changed / max(n_el, 1), 4), "scaling": scaling_for("", cfg),
        "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "architectures": mcfg.get("architectures"),
        "check_s": round(time.perf_counter() - t0, 1), **info,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--merged", required=True)
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint file with the LoRA weights")
    p.add_argument("--label", default="check_merge")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--device", default="cpu", help="where B@A and the comparisons run (cpu or cuda)")
    args = p.parse_args()
    try:
        row = {"stage": args.label, **check(Path(args.base), Path(args.merged), Path(args.ckpt), args.device)}
    except Exception as err:  # noqa: BLE001 - report, then fail
        row = {"stage": args.label, "ok": False, "failures": [f"{type(err).__name__}: {err}"]}
    print("RESULT " + json.dumps(row, default=str), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
    return 0 if row["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
