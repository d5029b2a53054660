"""Search efficiency of grid, random and TPE search for (r, M) -- the paper's Table 8.

The objective is exhaustively known: the validation loss of a short MoE-LoRA run of a tiny
LLaMA-style model on a synthetic multi-task problem, for every (r, M) of the grid, computed
once and cached in ``benchmarks/results/search_grid.json``. Each method then "searches" that
table; we count the trainings (distinct configurations evaluated) it needs before one of them
is within ``--tolerance`` (1 %) of the grid optimum, averaged over seeds. TPE and random run
through ``floe.search.search_rank`` itself (in-memory storage), so repeated proposals are
cache hits that cost no training. Grid search visits the grid in a fixed order (r, then M)
and must visit all of it to know it has the optimum.

    python benchmarks/search_efficiency.py [--seeds 20] [--recompute]

The grid takes a few minutes of CPU: run it under the project's CPU lock (see the notes).

The tiny task: sequences [bos, task, x1..x6, sep, y1..y6, eos] over 32 symbols. The base model
is first trained (all weights) on copy and reverse; MoE-LoRA (gate/up/down of every layer, as
the paper) then adapts it to three new tasks at once (shift by one, sort, swap pairs) for a
fixed number of steps; the value is the held-out loss on the response tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from floe.adapters.moe_lora import MoELoraConfig, apply_moe_lora
from floe.search import SearchConfig, search_rank

RESULTS = Path(__file__).resolve().parent / "results"
GRID_FILE = RESULTS / "search_grid.json"

# The paper's Table 8 space: r in [4, 64] step 4, number of experts in [2, 10].
PAPER_SPACE = dict(r_min=4, r_max=64, r_step=4, experts=list(range(2, 11)))
# The project's default space (paper §4 implementation details): r in [2, 32] step 2, M in {2, 3, 4}.
DEFAULT_SPACE = dict(r_min=2, r_max=32, r_step=2, experts=[2, 3, 4])

PAD, BOS, SEP, EOS, TASK0, SYM0, N_SYM, LEN = 0, 1, 2, 3, 4, 10, 32, 6
VOCAB = SYM0 + N_SYM
PRETRAIN_TASKS = ("copy", "reverse")
ADAPT_TASKS = ("shift", "sort", "swap")
ALL_TASKS = PRETRAIN_TASKS + ADAPT_TASKS

SETTINGS = dict(hidden=64, layers=2, heads=4, intermediate=128, pretrain_steps=600, pretrain_lr=3e-3,
                adapt_steps=80, adapt_lr=3e-3, batch=32, eval_examples=512, alpha=32.0, dropout=0.0, seed=0)


# ----------------------------------------------------------------------------- the tiny task


def _answer(task: str, x: torch.Tensor) -> torch.Tensor:
    s = x - SYM0
    if task == "copy":
        y = s
    elif task == "reverse":
        y = s.flip(-1)
    elif task == "shift":
        y = (s + 1) % N_SYM
    elif task == "sort":
        y = s.sort(-1).values
    elif task == "swap":
        y = s.view(*s.shape[:-1], LEN // 2, 2).flip(-1).reshape(s.shape)
    else:
        raise ValueError(task)
    return y + SYM0


def batch(tasks: tuple[str, ...], n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """n sequences of randomly chosen ``tasks``; labels (-100 elsewhere) on the response and eos."""
    which = torch.randint(len(tasks), (n,), generator=gen)
    x = torch.randint(SYM0, SYM0 + N_SYM, (n, LEN), generator=gen)
    y = torch.stack([_answer(tasks[int(k)], x[i]) for i, k in enumerate(which)])
    task_tok = torch.tensor([TASK0 + ALL_TASKS.index(tasks[int(k)]) for k in which]).unsqueeze(1)
    ids = torch.cat([torch.full((n, 1), BOS), task_tok, x, torch.full((n, 1), SEP), y, torch.full((n, 1), EOS)], 1)
    labels = ids.clone()
    labels[:, : 3 + LEN] = -100
    return {"input_ids": ids, "labels": labels}


def tiny_base(s: dict) -> transformers.PreTrainedModel:
    """A LLaMA-style model trained (all weights) on the pre-training tasks."""
    torch.manual_seed(s["seed"])
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   num_key_value_heads=s["heads"], max_position_embeddings=32,
                                   pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(s["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["pretrain_lr"], weight_decay=0.0)
    model.train()
    for _ in range(s["pretrain_steps"]):
        loss = model(**batch(PRETRAIN_TASKS, s["batch"], gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@torch.no_grad()
def eval_loss(model, data: dict[str, torch.Tensor]) -> float:
    model.eval()
    return float(model(**data).loss)


def adapt(base, r: int, m: int, s: dict, eval_data: dict[str, torch.Tensor]) -> float:
    """Held-out loss after ``adapt_steps`` steps of MoE-LoRA (r, m) on the adaptation tasks.

    A plain AdamW loop rather than ``floe.train``: the grid needs hundreds of runs of a model
    this small, where the Trainer's per-run set-up would cost more than the training itself.
    """
    import copy

    model = copy.deepcopy(base)
    torch.manual_seed(s["seed"])
    model = apply_moe_lora(model, MoELoraConfig(r=r, num_experts=m, lora_alpha=s["alpha"], lora_dropout=s["dropout"]))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["adapt_lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / s["adapt_steps"])
    gen = torch.Generator().manual_seed(s["seed"] + 1)
    model.train()
    for _ in range(s["adapt_steps"]):
        loss = model(**batch(ADAPT_TASKS, s["batch"], gen)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return eval_loss(model, eval_data)


def space_points(space: dict) -> list[tuple[int, int]]:
    """Grid order: r ascending, then M ascending."""
    return [(r, m) for r in range(space["r_min"], space["r_max"] + 1, space["r_step"]) for m in space["experts"]]


def compute_grid(path: Path) -> dict:
    """Evaluate every (r, M) of both spaces once and save them (atomically) to ``path``."""
    s = dict(SETTINGS)
    t0 = time.perf_counter()
    base = tiny_base(s)
    eval_data = batch(ADAPT_TASKS, s["eval_examples"], torch.Generator().manual_seed(12345))
    pre_data = batch(PRETRAIN_TASKS, s["eval_examples"], torch.Generator().manual_seed(12345))
    print(f"base model: {time.perf_counter() - t0:.0f}s; loss on pre-training tasks {eval_loss(base, pre_data):.3f}, "
          f"on the new tasks before adaptation {eval_loss(base, eval_data):.3f}", flush=True)
    points = sorted(set(space_points(PAPER_SPACE)) | set(space_points(DEFAULT_SPACE)))
    values: dict[str, float] = {}
    for i, (r, m) in enumerate(points):
        t1 = time.perf_counter()
        values[f"{r},{m}"] = adapt(base, r, m, s, eval_data)
        print(f"[{i + 1}/{len(points)}] r={r:>2} M={m:>2}: {values[f'{r},{m}']:.4f} ({time.perf_counter() - t1:.1f}s)",
              flush=True)
    data = {"settings": s, "tasks": {"pretrain": PRETRAIN_TASKS, "adapt": ADAPT_TASKS},
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - t0, 1), "values": values}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return data


# ----------------------------------------------------------------------------- the searches


def evaluations_to_reach(sequence: list[tuple[int, int]], table: dict[tuple[int, int], float], target: float) -> int | None:
    """Distinct configurations evaluated until (and including) the first one with value <= target."""
    seen: set[tuple[int, int]] = set()
    for p in sequence:
        seen.add(p)
        if table[p] <= target:
            return len(seen)
    return None


class _Reached(Exception):
    pass


def trainings_to_reach(sampler: str, seed: int, space: dict, table: dict[tuple[int, int], float], target: float,
                       budget: int) -> int | None:
    """Run ``floe.search`` with this sampler until it evaluates a configuration within the target.

    The objective is only called for configurations not seen before (repeats are cache hits),
    so its calls are the trainings a real search would pay for.
    """
    calls: list[tuple[int, int]] = []

    def objective(r: int, m: int, report) -> float:
        calls.append((r, m))
        if table[(r, m)] <= target:
            raise _Reached()
        return table[(r, m)]

    try:
        search_rank(objective, SearchConfig(n_trials=budget, seed=seed, sampler=sampler, pruner="none", **space))
    except _Reached:
        return len(calls)
    return None


def summarise(counts: list[int | None], size: int) -> dict:
    done = [c for c in counts if c is not None]
    return {"mean": statistics.mean(done) if done else None, "std": statistics.stdev(done) if len(done) > 1 else 0.0,
            "median": statistics.median(done) if done else None, "max": max(done) if done else None,
            "reached": len(done), "runs": len(counts), "size": size}


def compare(space_name: str, space: dict, values: dict[str, float], seeds: int, tol: float, budget: int) -> dict:
    points = space_points(space)
    table = {p: values[f"{p[0]},{p[1]}"] for p in points}
    best = min(table.values())
    target = best * (1 + tol)
    good = sum(v <= target for v in table.values())
    out = {"space": space_name, "size": len(points), "optimum": best,
           "argmin": [list(p) for p, v in table.items() if v == best], "within_tol": good,
           "value_range": [best, max(table.values())]}
    out["grid"] = summarise([evaluations_to_reach(points, table, target)], len(points))
    for sampler in ("random", "tpe"):
        out[sampler] = summarise([trainings_to_reach(sampler, s, space, table, target, budget)
                                  for s in range(seeds)], len(points))
    # reference: a uniformly random order of the grid needs (N + 1) / (K + 1) on average
    out["random_order_expectation"] = (len(points) + 1) / (good + 1)
    return out


def format_rows(res: dict, tol: float) -> str:
    n = res["size"]
    lines = [f"space {res['space']}: {n} configurations, optimum {res['optimum']:.4f} at (r, M) = "
             f"{', '.join(map(str, map(tuple, res['argmin'])))}; {res['within_tol']} within {tol:.0%} "
             f"(values {res['value_range'][0]:.4f}..{res['value_range'][1]:.4f})",
             f"{'method':<14} {'search space':>12} {'trainings to within ' + format(tol, '.0%'):>24} "
             f"{'relative cost':>14}  {'reached':>8}",
             f"{'grid (certify)':<14} {n:>12} {n:>24} {'100%':>14}  {'-':>8}"]
    g = res["grid"]
    lines.append(f"{'grid (r, M asc)':<14} {n:>12} {g['mean']:>24.0f} {g['mean'] / n:>14.0%}  {'1/1':>8}")
    e = res["random_order_expectation"]
    lines.append(f"{'(random order)':<14} {n:>12} {e:>24.1f} {e / n:>14.0%}  {'exact':>8}")
    for name in ("random", "tpe"):
        r = res[name]
        if r["mean"] is None:
            lines.append(f"{name:<14} {n:>12} {'not reached':>24}")
            continue
        cell = f"{r['mean']:.1f} ± {r['std']:.1f} (median {r['median']:.0f})"
        lines.append(f"{name:<14} {n:>12} {cell:>24} {r['mean'] / n:>14.0%}  {r['reached']:>3}/{r['runs']:<4}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20, help="search seeds per method (default 20)")
    p.add_argument("--tolerance", type=float, default=0.01, help="'reached' = within this share of the optimum")
    p.add_argument("--budget", type=int, default=None,
                   help="trial cap per search, cache hits included (default: 10 x the size of the space)")
    p.add_argument("--grid", type=Path, default=GRID_FILE, help="cached grid of losses")
    p.add_argument("--recompute", action="store_true", help="recompute the grid even if cached")
    p.add_argument("--out", type=Path, default=RESULTS / "search_efficiency.json")
    args = p.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    data = json.loads(args.grid.read_text()) if args.grid.is_file() and not args.recompute else compute_grid(args.grid)
    print(f"grid: {len(data['values'])} short MoE-LoRA runs of a tiny model ({data['settings']['adapt_steps']} steps "
          f"each; computed in {data['seconds']:.0f}s), cached in {args.grid.name}")
    results = []
    for name, space in (("paper Table 8 (r 4..64 step 4, M 2..10)", PAPER_SPACE),
                        ("default (r 2..32 step 2, M 2..4)", DEFAULT_SPACE)):
        n = len(space_points(space))
        t0 = time.perf_counter()
        res = compare(name, space, data["values"], args.seeds, args.tolerance, args.budget or 10 * n)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print()
        print(format_rows(res, args.tolerance))
    print(f"\nmean ± std over {args.seeds} seeds of the trainings (distinct configurations evaluated) until one is "
          f"within {args.tolerance:.0%} of the grid optimum; repeated proposals are cache hits and cost none. "
          "'grid (certify)': grid search must run the whole grid to know its best; '(random order)': the exact "
          "expectation for a random visiting order, (N + 1) / (K + 1) with K configurations within the tolerance.")
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps({"tolerance": args.tolerance, "seeds": args.seeds, "results": results}, indent=1) + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
