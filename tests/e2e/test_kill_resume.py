"""Kill and resume, as a user's machine does it: `vlm-lightning fit` is killed with SIGKILL after its second
checkpoint (no clean shutdown, no `on_exception`), then run again with `--ckpt_path last`. The final adapter
must be bit-identical to the one of a run that was never interrupted (CPU, fp32, fixed seed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.e2e.test_user_path import _fit_args, e2e_data  # noqa: F401  (e2e_data is a fixture)

REPO = Path(__file__).resolve().parents[2]


def _cmd(base: Path, data: dict, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm_lightning.cli", *_fit_args("qwen2_5_vl", "lora_sft", base, data, out, steps),
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={out / 'checkpoints'}", "--trainer.callbacks.every_n_train_steps=2",
            "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1", *extra]


def test_sigkill_after_the_second_checkpoint_then_resume_is_exact(tiny_vlm_dir, e2e_data, tmp_path):  # noqa: F811
    base = tiny_vlm_dir("qwen2_5_vl")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    whole, killed, marker = tmp_path / "whole", tmp_path / "killed", tmp_path / "paused"
    run = subprocess.run(_cmd(base, e2e_data, whole, 6), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]

    proc = subprocess.Popen(_cmd(base, e2e_data, killed, 6, "--trainer.callbacks+=tests.e2e.pause.PauseAt",
                                 "--trainer.callbacks.step=4", f"--trainer.callbacks.marker={marker}"),
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 900
    while not marker.exists():
        assert proc.poll() is None, f"the fit ended before step 4: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the fit never reached step 4"
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpts = sorted(p.name for p in (killed / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and len(ckpts) == 3, ckpts  # step 2, step 4 and last (= step 4)
    assert not (killed / "adapter").exists()  # the fit never ended: no adapter was written

    run = subprocess.run([*_cmd(base, e2e_data, killed, 6), "--ckpt_path=last"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(whole / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical
