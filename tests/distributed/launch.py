"""Run ``tests/distributed/ddp_worker.py`` as a 2-process Lightning job and load each rank's dump.

A hang (mismatched collectives) shows up as a timeout: the whole process group is killed and the test fails
with the output tail, instead of CI waiting forever.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT_S = int(os.environ.get("VLM_DDP_TEST_TIMEOUT", "420"))


def run_worker(out: Path, model_dir: Path, *args: str, expect_ok: bool = True,
               timeout: int = WORKER_TIMEOUT_S) -> tuple[int, str]:
    """Run the worker (2 ranks, gloo); returns (exit code, stdout+stderr)."""
    cmd = [sys.executable, "-m", "tests.distributed.ddp_worker", "--model", str(model_dir), "--out", str(out),
           *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)  # a launcher's variables would make the worker think it is a child rank
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is rank 0's child: kill the group we started
        output, _ = proc.communicate()
        raise AssertionError(f"distributed worker did not finish in {timeout}s (a hang?):\n{output[-6000:]}") from None
    if expect_ok:
        assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{output[-8000:]}"
    return proc.returncode, output


def load_ranks(out: Path, world_size: int = 2) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
