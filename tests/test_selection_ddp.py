"""Layer selection under torchrun (2 processes, gloo on CPU) equals the single-process result.

Run as a script by ``torch.distributed.run`` (the ``__main__`` block): every rank calls
``select_layers`` on the same batches (5 of them, so the ranks hold 3 and 2) and each rank
writes what it got; the test compares both ranks with an in-process run.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CONFIGS = {
    "floe": dict(top_k=2, stability=True, stability_fractions=[1.0, 0.6], seed=3),
    "fim_variance": dict(scorer="fim_variance", top_k=2),
}


def _selections() -> dict[str, dict]:
    import torch

    from floe.selection import SelectionConfig, select_layers
    from test_selection_model import adapted_model, make_batches

    torch.set_num_threads(1)
    out = {}
    for name, kw in CONFIGS.items():
        sel = select_layers(adapted_model("qwen2"), None, make_batches(5, seed=11), SelectionConfig(**kw))
        out[name] = dict(ranking=sel.ranking, chosen=sel.chosen, scores=sel.scores,
                         untuned=sel.untuned_scores, stability=sel.stability,
                         world=sel.fingerprints["world_size"], data=sel.fingerprints["data"])
    return out


@pytest.mark.slow
def test_torchrun_two_processes_give_the_single_process_ranking(tmp_path):
    with socket.socket() as s:  # a free port: other tests may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(Path(__file__)), str(tmp_path)],
        check=False, capture_output=True, text=True, env=env, timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = _selections()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, ref in single.items():
            res = got[name]
            assert res["world"] == 2 and ref["world"] == 1
            assert res["data"] == ref["data"]
            assert res["ranking"] == ref["ranking"], (rank, name)
            assert res["chosen"] == ref["chosen"]
            for a, b in zip(res["scores"], ref["scores"]):
                assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (rank, name, res["scores"], ref["scores"])
            if ref["stability"] is not None:
                assert res["stability"]["rankings"] == ref["stability"]["rankings"]


if __name__ == "__main__":
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    dist.init_process_group("gloo")
    result = _selections()
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
