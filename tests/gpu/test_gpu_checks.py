"""GPU checks of the training spine, each a script beside this file run in a process of its own.

  fsdp_smoke.py      VisionFSDPStrategy on one GPU, 16-bit LoRA and 4-bit QLoRA: FSDP units, finite loss,
                     LoRA moved, full state gathered, checkpoint = trainable weights, adapter reloads, merge.
  sft_gpu_check.py   VisionSFTModule LoRA and QLoRA on the Qwen2.5-VL-7B shape: loss finite and falling, exactly
                     the language model's linears in 4 bit, B moved, frozen weights unchanged.

Each script asserts its own checks and exits non-zero when one fails; the tests here run it, then read back what
it wrote. What they leave out: the CPU dry runs of the same scripts (``--cpu`` / ``--tiny``, minutes each: run
them by hand, see each script's opening) and speed (benchmarks/ measures it; no test asserts a timing).

    pytest -m cuda tests/gpu/test_gpu_checks.py      (~5 min on one H200)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def test_fsdp_one_gpu_smoke(tmp_path):
    proc = _run("fsdp_smoke.py", "--out", str(tmp_path), "--steps", "3")
    assert "FSDP smoke OK" in proc.stdout
    summary = json.loads((tmp_path / "fsdp_smoke.json").read_text())
    assert summary["failed"] == []
    assert [r["arm"] for r in summary["results"]] == ["fsdp", "fsdp_qlora"]
    for result in summary["results"]:
        arm = result["arm"]
        assert result["fsdp_units"] == ["Qwen2_5_VLDecoderLayer"]
        assert result["lora_tensors"] > 0
        assert (tmp_path / arm / "adapter" / "adapter_model.safetensors").exists()
        assert Path(result["merged"]).is_dir()


def test_sft_lora_and_qlora_on_the_7b_shape(tmp_path):
    jsonl = tmp_path / "sft_gpu_check.jsonl"
    _run("sft_gpu_check.py", "--out", str(tmp_path), "--jsonl", str(jsonl))
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["arm"] for r in rows] == ["lora", "qlora"]
    for row in rows:
        checks = row["checks"]
        failed = [name for name, value in checks.items() if isinstance(value, bool) and not value]
        assert row["ok"] and not failed, f"{row['arm']}: failed checks {failed}: {checks}"
        assert checks["finite"] and checks["loss_falls"] and checks["lora_B_moved"] and checks["base_unchanged"]
    qlora = rows[1]["checks"]
    assert qlora["linear4bit_exactly_language_model"] and qlora["n_linear4bit"] > 0 and qlora["no_fp32_frozen"]
