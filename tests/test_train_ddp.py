"""Data-parallel training (torchrun, gloo on CPU) keeps every rank's adapter identical."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_ddp_steps_end_with_identical_adapters_on_both_ranks(tmp_path):
    (tmp_path / "data0").mkdir()
    (tmp_path / "data1").mkdir()
    with socket.socket() as s:  # a free port: other tests may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).with_name("ddp_train_script.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script), str(tmp_path)],
        check=False, capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    trained = [k for k in r0 if not k.startswith("init.")]
    assert trained
    for k in trained:
        assert torch.equal(r0[k], r1[k]), k
    # the steps did something: B left zero on both ranks
    assert any(not torch.equal(r0[k], r0[f"init.{k}"]) for k in trained if ".lora_B." in k)
