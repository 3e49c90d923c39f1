"""Shared helpers of the benchmark scripts: model shapes, synthetic batches, timing, result records.

The benchmarks never download weights: the Qwen2.5-VL-7B *shape* is built from its real config with
random weights (seeded), saved once to a local folder, and every arm loads that same folder.
Timing: ``do_bench`` (median ms), ``sync``, ``peak_extra_gib``. It leaves out: the per-step timers
(each script's Lightning callback times its own arms) and the baselines (``vlm_lightning.kernels.reference``,
Liger, HF+PEFT: imported by the scripts that compare against them).

A script in ``benchmarks/`` runs with its own folder first on ``sys.path`` and imports this as ``import utils``
(the helpers in ``benchmarks/e2e/`` put the parent folder there first)::

    config = utils.build_config(tiny=True)
    batch = utils.synthetic_vlm_batch(config, batch=2, seq_len=128, image_side=112)
    utils.append_jsonl("benchmarks/out/x.jsonl", [utils.record("x", "ours", {"batch": 2}, {"ms": 1.0})])
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

# Qwen/Qwen2.5-VL-7B-Instruct config.json (the fields that set the shape).
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen2_5_vl_text",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "rope_type": "default"},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "model_type": "qwen2_5_vl",
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "in_chans": 3,
        "hidden_act": "silu",
        "tokens_per_second": 2,
    },
}

LANGUAGE_LINEARS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def tiny_qwen25_overrides() -> dict:
    """A CPU-sized version of the same architecture, for smoke-testing the scripts here."""
    return {
        "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2,
                        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3], "rope_type": "default"}},
        "vision_config": {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                          "out_hidden_size": 64, "fullatt_block_indexes": [1]},
    }


def build_config(tiny: bool = False):
    """The ``transformers`` config of the 7B shape (``tiny``: the CPU shape of ``tiny_qwen25_overrides``)."""
    from transformers import AutoConfig  # heavy import: only the scripts that build a model need it

    cfg = json.loads(json.dumps(QWEN25_VL_7B))
    if tiny:
        for k, v in tiny_qwen25_overrides().items():
            cfg[k].update(v)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **cfg)


def synthetic_vlm_batch(config, batch: int, seq_len: int, image_side: int = 448, seed: int = 0,
                        device="cpu") -> dict:
    """One 448x448 image per row (256 merged image tokens at the 7B shape), text tokens random.

    Layout per row: [text 16] <vision_start> <image_pad> x N <vision_end> [text ...] ; labels are the
    input ids on the text after the image (the "answer"), -100 on the image span and the prefix.
    """
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    patches_side = image_side // vc.patch_size
    n_patches = patches_side * patches_side
    n_img_tokens = n_patches // (vc.spatial_merge_size ** 2)
    vocab = config.text_config.vocab_size
    low = 100
    high = min(vocab, 151000)
    ids = torch.randint(low, high, (batch, seq_len), generator=g)
    start = 16
    ids[:, start] = config.vision_start_token_id
    ids[:, start + 1:start + 1 + n_img_tokens] = config.image_token_id
    ids[:, start + 1 + n_img_tokens] = config.vision_end_token_id
    labels = ids.clone()
    labels[:, : start + 2 + n_img_tokens] = -100
    mm = torch.zeros_like(ids, dtype=torch.int32)
    mm[:, start + 1:start + 1 + n_img_tokens] = 1
    pix_dim = 3 * vc.temporal_patch_size * vc.patch_size * vc.patch_size
    pixel_values = torch.randn(batch * n_patches, pix_dim, generator=g)
    grid = torch.tensor([[1, patches_side, patches_side]] * batch)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
           "pixel_values": pixel_values, "image_grid_thw": grid, "mm_token_type_ids": mm}
    return {k: v.to(device) for k, v in out.items()}


def sync() -> None:
    """Wait for the GPU (no-op on the CPU), so wall-clock timings cover the queued kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def do_bench(fn, grad_to_none=None, rep=60) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, two plain timings on the CPU."""
    if torch.cuda.is_available():
        import triton.testing  # heavy import: only the GPU path times with it

        return float(triton.testing.do_bench(fn, warmup=10, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))
    times = []  # CPU smoke: a couple of plain timings
    for _ in range(2):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_extra_gib(fn) -> float | None:
    """GPU memory ``fn()`` allocates above what was allocated before it, at its peak (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**30


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "lightning", "triton", "bitsandbytes", "liger_kernel"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            out[name] = None
    return out


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001
        return os.environ.get("VLM_COMMIT", "unknown")


def record(benchmark: str, arm: str, config: dict, figures: dict) -> dict:
    return {"date": _dt.date.today().isoformat(), "device": device_name(), "versions": versions(),
            "commit": git_commit(), "benchmark": benchmark, "arm": arm, "config": config, **figures}


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def profile_table(prof, step_s: float, top: int = 25) -> str:
    """Markdown table of the ``top`` GPU kernels of a ``torch.profiler`` trace by self device time, each with
    its share of the profiled step's wall time (``step_s``) and its call count."""
    kernel = torch.autograd.DeviceType.CUDA  # kernels and copies only: CPU ops' device totals double-count them
    events = [e for e in prof.key_averages() if e.device_type == kernel and e.self_device_time_total > 0
              and not e.key.startswith(("Optimizer.", "ProfilerStep"))]  # annotations, not kernels
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_ms = sum(e.self_device_time_total for e in events) / 1e3
    lines = [f"step {step_s * 1e3:.0f} ms wall; GPU kernels busy {total_ms:.0f} ms "
             f"({total_ms / (step_s * 1e3):.0%} of the step)", "",
             "| kernel | calls | GPU ms | share of step |", "|---|---|---|---|"]
    for e in events[:top]:
        ms = e.self_device_time_total / 1e3
        name = e.key.replace("|", "/")[:90]
        lines.append(f"| `{name}` | {e.count} | {ms:.1f} | {ms / (step_s * 1e3):.1%} |")
    return "\n".join(lines)


def cpu_table(prof, top: int = 30) -> str:
    """Markdown table of the ``top`` host-side ops by self CPU time (where a GPU-idle step spends its time)."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    lines = ["| op (host) | calls | self CPU ms | CPU ms incl. children |", "|---|---|---|---|"]
    for e in events[:top]:
        lines.append(f"| `{e.key.replace('|', '/')[:90]}` | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
                     f"{e.cpu_time_total / 1e3:.1f} |")
    return "\n".join(lines)


def profile_callback(step_index: int, out_path: Path):
    """A Lightning callback that traces optimizer step ``step_index`` with ``torch.profiler`` (CPU + CUDA) and
    writes ``profile_table`` to ``out_path`` (markdown) when the step ends."""
    import lightning as L  # heavy import: only the profiled arms need Lightning here

    class _Profile(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == step_index:
                acts = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    acts.append(torch.profiler.ProfilerActivity.CUDA)
                sync()
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == step_index:
                sync()
                step_s = time.perf_counter() - self.t0
                self.prof.__exit__(None, None, None)
                table = profile_table(self.prof, step_s) + "\n\nHost side:\n\n" + cpu_table(self.prof)
                Path(out_path).parent.mkdir(parents=True, exist_ok=True)
                Path(out_path).write_text(table + "\n")
                print(table, flush=True)

    return _Profile()


class StepTimer:
    """Times each optimizer step from batch start to batch end, device-synchronised."""

    def __new__(cls, device):
        import lightning as L  # heavy import: only the Trainer-driven arms need it

        class _Timer(L.Callback):
            def __init__(self):
                self.times, self.losses, self.fit_start, self.first_step_end = [], [], None, None

            def on_train_start(self, trainer, pl_module):
                self.fit_start = time.perf_counter()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if device == "cuda":
                    torch.cuda.synchronize()
                    if batch_idx == 0:
                        torch.cuda.reset_peak_memory_stats()
                self._t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if device == "cuda":
                    torch.cuda.synchronize()
                now = time.perf_counter()
                self.times.append(now - self._t0)
                if self.first_step_end is None:
                    self.first_step_end = now
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self.losses.append(float(loss))

        return _Timer()


def cap_gpu_memory(gib: float) -> None:
    """Let this process use at most ``gib`` GiB of the GPU (0: no cap), e.g. 80 on a 141 GB H200 to find what
    fits an 80 GB card."""
    if gib and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total))


def run_child(arm: str, cmd: list[str]) -> dict:
    """Run one benchmark arm in its own process (``cmd`` prints ``RESULT <json>``): its result with ``wall_s``,
    or ``{"arm", "error"}`` (stderr's tail, also printed) when it fails."""
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not line:
        print(f"[{arm}] FAILED rc={r.returncode}\n{r.stderr[-3000:]}", flush=True)
        return {"arm": arm, "error": r.stderr[-1500:]}
    return {**json.loads(line[-1][7:]), "wall_s": time.perf_counter() - t}
