"""Fused kernels vs torch eager, torch.compile and Liger-Kernel at Qwen2.5-VL-7B shapes (Gemma-3-4B where
they differ): forward, backward and both; median ms (triton.testing.do_bench), achieved GB/s or TFLOP/s
against this GPU's ceilings measured in the same run (device copy bandwidth, bf16 matmul), and the peak
extra memory of one call.

Each op is timed alone with a fixed upstream gradient (no surrounding loss), so the memory-bound rows can
be read against the copy roofline. Bytes moved (bf16, 2 B/elt): RMSNorm fwd 2NH, bwd 3NH; gated act fwd
3NI, bwd 5NI; RoPE fwd/bwd 2(q+k) + cos/sin; LayerNorm fwd 2NH. Linear + loss rows report model TFLOP/s:
2NHV per GEMM over all N tokens (fwd 1 GEMM; fwd+bwd 2 with a frozen head, 3 with a trainable one), so
skipping ignored tokens shows up as a higher effective rate. For our fused cross-entropy the gradient is
computed inside the forward (Liger's design): its "bwd" row is only the final scaling; compare "both".

What it leaves out: Unsloth (not installed on the GPU machine), CCE, full-model steps (bench_sft_step.py does
those).
Every arm runs in try/except: a failure (e.g. Liger missing) is reported in the table, not fatal.
A time budget (--budget-s, default 150) skips the remaining torch.compile arms if the run gets long.

Run (GPU, < 4 min on one H200):
    python benchmarks/bench_kernels.py --jsonl benchmarks/results.jsonl --md benchmarks/out/kernels.md
Smoke (CPU, Triton interpreter, tiny shapes):
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --tiny --arms ours,eager
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import utils

from vlm_lightning.kernels import (
    apply_rope,
    apply_rope_from_positions,
    fused_linear_cross_entropy,
    fused_linear_token_logprobs,
    gated_act,
    layer_norm,
    rms_norm,
)
from vlm_lightning.kernels import reference as R

MODES = ("fwd", "bwd", "both")
ARMS = ("ours", "eager", "compile", "liger")


def ceilings(dev) -> dict:
    """Copy bandwidth (GB/s) and bf16 matmul rate (TFLOP/s) measured now, on this device."""
    if dev.type != "cuda":
        return {"copy_gbps": None, "bf16_tflops": None}
    x = torch.empty(2**29, dtype=torch.uint8, device=dev)  # 512 MiB
    y = torch.empty_like(x)
    ms = utils.do_bench(lambda: y.copy_(x), rep=100)
    copy = 2 * x.numel() / ms / 1e6
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = utils.do_bench(lambda: a @ b, rep=100)
    return {"copy_gbps": copy, "bf16_tflops": 2 * 8192**3 / ms / 1e9}


# -------------------------------------------------------------------------------------------- cases
class Case:
    """One op at one shape. make() -> list of input tensors (leaves; requires_grad as flagged);
    arms: name -> fn(*inputs) -> tensor or tuple; work(mode) -> (bytes, flops) for the rate column."""

    def __init__(self, name, config, make, arms, work, modes=MODES):
        self.name, self.config, self.make, self.arms, self.work, self.modes = name, config, make, arms, work, modes


def _liger(path, attr):
    mod = __import__(path, fromlist=[attr])
    return getattr(mod, attr)


def rms_case(dev, dt, n, h, gemma, tag):
    off, cast = (1.0, "gemma") if gemma else (0.0, "llama")

    def make():
        return [torch.randn(n, h, device=dev, dtype=dt).requires_grad_(),
                (torch.randn(h, device=dev, dtype=dt) * 0.1 + (0 if gemma else 1)).requires_grad_(False)]

    def liger(x, w):
        fn = _liger("liger_kernel.ops.rms_norm", "LigerRMSNormFunction")
        return fn.apply(x, w, 1e-6, off, cast, False)

    arms = {"ours": lambda x, w: rms_norm(x, w, 1e-6, off, cast),
            "eager": lambda x, w: R.rms_norm_ref(x, w, 1e-6, off, cast), "liger": liger}
    e = torch.finfo(dt).bits // 8
    return Case(f"rms_norm{'_gemma' if gemma else ''}", {"shape": tag, "rows": n, "hidden": h, "frozen_weight": True},
                make, arms, lambda m: ({"fwd": 2, "bwd": 3, "both": 5}[m] * n * h * e, 0))


def layer_norm_case(dev, dt, n, h, tag):
    def make():
        return [torch.randn(n, h, device=dev, dtype=dt), torch.randn(h, device=dev, dtype=dt),
                torch.randn(h, device=dev, dtype=dt)]

    def liger(x, w, b):
        return _liger("liger_kernel.ops.layer_norm", "LigerLayerNormFunction").apply(x, w, b, 1e-6)

    arms = {"ours": lambda x, w, b: layer_norm(x, w, b, 1e-6),
            "eager": lambda x, w, b: F.layer_norm(x, (h,), w, b, 1e-6), "liger": liger}
    e = torch.finfo(dt).bits // 8
    return Case("layer_norm_fwd", {"shape": tag, "rows": n, "hidden": h}, make, arms,
                lambda m: (2 * n * h * e, 0), modes=("fwd",))


def gated_case(dev, dt, n, i, act, tag):
    def make():
        return [torch.randn(n, i, device=dev, dtype=dt).requires_grad_(),
                torch.randn(n, i, device=dev, dtype=dt).requires_grad_()]

    def eager(g, u):  # HF: act_fn(gate_proj(x)) * up_proj(x), in the model dtype
        return (F.silu(g) if act == "swiglu" else F.gelu(g, approximate="tanh")) * u

    def liger(g, u):
        name = ("liger_kernel.ops.swiglu", "LigerSiLUMulFunction") if act == "swiglu" else \
            ("liger_kernel.ops.geglu", "LigerGELUMulFunction")
        return _liger(*name).apply(g, u)

    arms = {"ours": lambda g, u: gated_act(g, u, act), "eager": eager, "liger": liger}
    e = torch.finfo(dt).bits // 8
    return Case(act, {"shape": tag, "rows": n, "intermediate": i}, make, arms,
                lambda m: ({"fwd": 3, "bwd": 5, "both": 8}[m] * n * i * e, 0))


def rope_case(dev, dt, b, t, hq, hk, d, mrope, tag):
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    if mrope:
        pos = torch.stack([torch.arange(t, device=dev)[None].expand(b, t),
                           (torch.arange(t, device=dev) % 16)[None].expand(b, t),
                           (torch.arange(t, device=dev) // 16)[None].expand(b, t)])
        sec = [d // 8, 3 * d // 16, 3 * d // 16]  # [16, 24, 24] at d=128
    else:
        pos, sec = torch.arange(t, device=dev)[None].expand(b, t), None
    cos, sin = R.rope_cos_sin_ref(pos, inv, sec, dtype=dt)  # what HF's rotary embedding hands the layers

    def make():
        return [torch.randn(b, t, hq, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_(),
                torch.randn(b, t, hk, d, device=dev, dtype=dt).transpose(1, 2).requires_grad_()]

    def liger(q, k):
        return _liger("liger_kernel.ops.rope", "LigerRopeFunction").apply(q, k, cos, sin, None, 1)

    arms = {"ours": lambda q, k: apply_rope(q, k, cos, sin),
            "eager": lambda q, k: R.rope_ref(q, k, cos, sin), "liger": liger}
    if mrope:
        arms["ours_from_pos"] = lambda q, k: apply_rope_from_positions(q, k, pos, inv, sec)

        def eager_from_pos(q, k):  # HF: rotary embedding (cos/sin build, M-RoPE recomposition) + apply
            c, s = R.rope_cos_sin_ref(pos, inv, sec, dtype=dt)
            return R.rope_ref(q, k, c, s)

        arms["eager_from_pos"] = eager_from_pos
    e = torch.finfo(dt).bits // 8
    qk = b * t * (hq + hk) * d * e
    return Case("mrope" if mrope else "rope", {"shape": tag, "batch": b, "seq": t, "q_heads": hq, "kv_heads": hk,
                                               "head_dim": d, "mrope_section": sec},
                make, arms, lambda m: ((2 if m == "both" else 1) * (2 * qk + 2 * b * t * d * e), 0))


def flce_case(dev, dt, n, h, v, train_w, ignore_frac, softcap, tag):
    g = torch.Generator(device=dev).manual_seed(0)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[torch.rand(n, device=dev, generator=g) < ignore_frac] = -100

    def make():
        return [torch.randn(n, h, device=dev, dtype=dt).requires_grad_(),
                (torch.randn(v, h, device=dev, dtype=dt) * 0.02).requires_grad_(train_w)]

    def eager(x, w):  # HF: logits in the model dtype, then .float() and cross_entropy
        z = (x @ w.t()).float()
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        return F.cross_entropy(z, y, ignore_index=-100)

    def liger(x, w):
        cls = _liger("liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss")
        if not hasattr(liger, "fn"):
            liger.fn = cls(ignore_index=-100, softcap=softcap) if softcap else cls(ignore_index=-100)
        out = liger.fn(w, x, y)
        return out[0] if isinstance(out, tuple) else getattr(out, "loss", out)

    arms = {"ours": lambda x, w: fused_linear_cross_entropy(x, w, y, softcap=softcap), "eager": eager,
            "liger": liger}
    for rows in (256, 1024):
        arms[f"ours_chunk{rows}"] = (lambda r: lambda x, w: fused_linear_cross_entropy(
            x, w, y, softcap=softcap, chunk_rows=r))(rows)
    gemms = {"fwd": 1, "bwd": 2 if train_w else 1, "both": 3 if train_w else 2}
    return Case("linear_cross_entropy", {"shape": tag, "tokens": n, "hidden": h, "vocab": v,
                                         "trainable_head": train_w, "ignored_frac": ignore_frac, "softcap": softcap},
                make, arms, lambda m: (0, gemms[m] * 2 * n * h * v), modes=("fwd", "both"))


def logprobs_case(dev, dt, n, h, v, temp, tag):
    g = torch.Generator(device=dev).manual_seed(1)
    t = torch.randint(0, v, (n,), device=dev, generator=g)

    def make():
        return [torch.randn(n, h, device=dev, dtype=dt).requires_grad_(),
                (torch.randn(v, h, device=dev, dtype=dt) * 0.02).requires_grad_(False)]

    def eager(x, w):  # TRL-style: logits, / T, log_softmax, gather
        z = (x @ w.t()).float() / temp
        return torch.log_softmax(z, -1).gather(1, t[:, None])[:, 0]

    arms = {"ours": lambda x, w: fused_linear_token_logprobs(x, w, t, temperature=temp), "eager": eager}
    # model FLOPs (frozen head): fwd 1 GEMM, bwd 1 (grad_h); ours also recomputes the logits in backward
    gemms = {"fwd": 1, "bwd": 1, "both": 2}
    return Case("token_logprobs", {"shape": tag, "tokens": n, "hidden": h, "vocab": v, "temperature": temp},
                make, arms, lambda m: (0, gemms[m] * 2 * n * h * v))


def build_cases(dev, dt, tiny: bool):
    if tiny:
        return [rms_case(dev, dt, 33, 96, False, "tiny"), rms_case(dev, dt, 33, 80, True, "tiny"),
                gated_case(dev, dt, 17, 192, "swiglu", "tiny"), gated_case(dev, dt, 17, 160, "geglu_tanh", "tiny"),
                rope_case(dev, dt, 2, 16, 4, 2, 16, True, "tiny"), layer_norm_case(dev, dt, 40, 48, "tiny"),
                flce_case(dev, dt, 64, 32, 500, False, 0.3, None, "tiny"),
                logprobs_case(dev, dt, 48, 32, 400, 0.9, "tiny")]
    q7, g4 = "qwen2.5-vl-7b", "gemma-3-4b"
    return [  # the four rows first (the compile arms stop at --budget-s)
        rms_case(dev, dt, 8192, 3584, False, q7),
        gated_case(dev, dt, 8192, 18944, "swiglu", q7),
        rope_case(dev, dt, 4, 2048, 28, 4, 128, True, q7),
        flce_case(dev, dt, 8192, 3584, 152064, False, 0.3, None, q7),
        logprobs_case(dev, dt, 8192, 3584, 152064, 0.9, q7),
        rms_case(dev, dt, 8192, 2560, True, g4),
        gated_case(dev, dt, 8192, 10240, "geglu_tanh", g4),
        rope_case(dev, dt, 4, 2048, 8, 4, 256, False, g4),
        flce_case(dev, dt, 8192, 2560, 262208, False, 0.3, None, g4),
        flce_case(dev, dt, 8192, 3584, 152064, True, 0.3, None, q7 + " trainable head"),
        layer_norm_case(dev, dt, 16384, 1280, "qwen2-vl vit"),
        layer_norm_case(dev, dt, 16384, 1152, "gemma-3 siglip"),
    ]


# ----------------------------------------------------------------------------------------- running
def run_arm(case, arm, fn, mode, dev):
    inputs = case.make()
    leaves = [x for x in inputs if x.requires_grad]
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    with torch.no_grad():
        probe = as_tuple(fn(*[x.detach() for x in inputs]))
    ups = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in probe]
    del probe

    def fwd():
        return fn(*inputs)

    def both():
        outs = as_tuple(fn(*inputs))
        torch.autograd.backward(outs, ups)
        return outs

    if mode == "fwd":
        ms = utils.do_bench(fwd)
        mem = utils.peak_extra_gib(fwd)
    elif mode == "both":
        ms = utils.do_bench(both, grad_to_none=leaves)
        for x in leaves:
            x.grad = None
        mem = utils.peak_extra_gib(both)
    else:
        outs = as_tuple(fwd())
        ms = utils.do_bench(lambda: torch.autograd.backward(outs, ups, retain_graph=True), grad_to_none=leaves)
        mem = None
    return ms, mem


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help="subset of ours,eager,compile,liger")
    p.add_argument("--only", default="", help="comma list of op names to run (default all)")
    p.add_argument("--jsonl", default=None, help="append one JSON object per (op, arm, mode) here")
    p.add_argument("--md", default=None, help="write the markdown table here")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--budget-s", type=float, default=150.0, help="skip torch.compile arms after this")
    args = p.parse_args()
    t_start = time.perf_counter()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    want = set(args.arms.split(","))
    ceil = ceilings(dev)
    print(f"device: {utils.device_name()}  ceilings: {ceil}", flush=True)
    rows, records = [], []
    only = set(filter(None, args.only.split(",")))
    for case in build_cases(dev, dt, args.tiny):
        if only and case.name not in only:
            continue
        arms = {}
        for name, fn in case.arms.items():
            family = "ours" if name.startswith("ours") else "eager" if name.startswith("eager") else name
            if family in want:
                arms[name] = fn
        if "compile" in want and "eager" in case.arms:
            arms["compile"] = torch.compile(case.arms["eager"], dynamic=False)
        for arm, fn in arms.items():
            for mode in case.modes:
                fig = {"op": case.name, "mode": mode, "dtype": str(dt).replace("torch.", "")}
                if arm == "compile" and time.perf_counter() - t_start > args.budget_s:
                    fig["error"] = "skipped: time budget"
                else:
                    try:
                        ms, mem = run_arm(case, arm, fn, mode, dev)
                        nbytes, flops = case.work(mode)
                        fig.update(ms=ms, peak_extra_gib=mem)
                        if nbytes:
                            fig["gbps"] = nbytes / ms / 1e6
                            if ceil["copy_gbps"]:
                                fig["frac_copy_bw"] = fig["gbps"] / ceil["copy_gbps"]
                        if flops:
                            fig["tflops"] = flops / ms / 1e9
                            if ceil["bf16_tflops"]:
                                fig["frac_matmul_peak"] = fig["tflops"] / ceil["bf16_tflops"]
                    except Exception as e:  # noqa: BLE001 - report and go on
                        fig["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                        if os.environ.get("BENCH_DEBUG"):
                            traceback.print_exc()
                    finally:
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                rows.append((case, arm, fig))
                records.append(utils.record("kernels", arm, {**case.config, **ceil}, fig))
                msg = fig.get("error") or f"{fig['ms']:.3f} ms"
                print(f"[{case.name} {case.config['shape']}] {arm:>16} {mode:>4}: {msg}", flush=True)
    table = render(rows)
    print(table)
    print(f"total {time.perf_counter() - t_start:.0f} s")
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        head = (f"Kernels on {utils.device_name()} ({dt}), ceilings measured in the same run: {ceil}, "
                f"commit {utils.git_commit()}\n\n")
        Path(args.md).write_text(head + table + "\n")
    if args.jsonl:
        utils.append_jsonl(args.jsonl, records)


def render(rows) -> str:
    """One line per (op, shape, mode, arm) with ms, rate, memory, and ratios vs eager / compile / liger."""
    index = {}
    for case, arm, fig in rows:
        index[(case.name, case.config["shape"], fig["mode"], arm)] = fig
    out = ["| op | shape | mode | arm | ms | GB/s or TFLOP/s | % ceiling | extra GiB | x eager | x compile | x liger |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, arm, fig in rows:
        key = (case.name, case.config["shape"], fig["mode"])
        if "error" in fig:
            out.append(f"| {case.name} | {key[1]} | {key[2]} | {arm} | {fig['error'][:70]} | | | | | | |")
            continue
        rate = (f"{fig['gbps']:.0f} GB/s" if "gbps" in fig else f"{fig['tflops']:.0f} TFLOP/s" if "tflops" in fig
                else "")
        frac = fig.get("frac_copy_bw", fig.get("frac_matmul_peak"))
        mem = "" if fig.get("peak_extra_gib") is None else f"{fig['peak_extra_gib']:.2f}"

        def ratio(other, key=key, fig=fig, arm=arm):
            o = index.get(key + (other,))
            return f"{o['ms'] / fig['ms']:.2f}" if o and "ms" in o and other != arm else ""

        out.append(f"| {case.name} | {key[1]} | {key[2]} | {arm} | {fig['ms']:.3f} | {rate} | "
                   f"{'' if frac is None else f'{frac:.0%}'} | {mem} | {ratio('eager')} | "
                   f"{ratio('compile')} | {ratio('liger')} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
