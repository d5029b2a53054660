"""Forward+backward cost of one MoE-LoRA layer against its floor and a per-expert loop.

One linear of SmolLM2-135M's FFN size (576 → 1536), 4 × 256 tokens, float32, CPU, train
mode (dropout 0.05 everywhere). Variants, timed interleaved in one run (each repetition runs
every variant once, in a shuffled order; warm-up first; medians of many repetitions):

- ``base``        the frozen ``nn.Linear`` alone (input requires grad, so its backward
                  computes dx like every other variant);
- ``fused M=..``  ``MoELoraLinear`` (r, M; the PEFT layer ``get_peft_model`` builds) — one
                  product with the concatenated experts;
- ``lora r=M·r``  the same module with M = 1 and rank M·r: plain LoRA, the floor for dense
                  routing (every token touches M·r·d_out expert weights);
- ``loop M=..``   HydraLoRA-style: A·dropout(x) recomputed per expert, M separate B products.

The adapter's own cost is (layer time − base time), taken per repetition and then the
median. Targets (issue 2): fused ≤ 1.15 × plain LoRA of rank M·r; loop ≥ 2 × fused at M = 4.

    python benchmarks/moe_lora_layer.py            # --help for sizes, M list, repetitions
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from floe.adapters.moe_lora import MoELoraLinear


class HydraLoopLinear(nn.Module):
    """HydraLoRA-style forward: ``y = Wx + s · Σ_i w_i · B_i(A(dropout(x)))`` as a Python loop.

    As in HydraLoRA's reference implementation, the shared A (and the dropout) is applied
    again for each expert and each B_i is its own ``nn.Linear``. Written here only as a
    baseline; it is not part of the library.
    """

    def __init__(self, base: nn.Linear, r: int, num_experts: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_experts))
        self.router = nn.Linear(base.in_features, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = F.softmax(self.router(x).float(), dim=-1).to(x.dtype)
        for i, b in enumerate(self.lora_B):
            y = y + w[..., i : i + 1] * b(self.lora_A(self.lora_dropout(x))) * self.scaling
        return y


def _randomise(module: nn.Module, seed: int) -> None:
    """Non-zero expert weights, as after some training (timing does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.requires_grad and ("lora_B" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _time_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    x.grad = None
    for p in module.parameters():
        p.grad = None
    t0 = time.perf_counter()
    module(x).backward(grad_out)
    return time.perf_counter() - t0


def build_variants(base: nn.Linear, r: int, experts: list[int], alpha: float, dropout: float) -> dict[str, nn.Module]:
    variants: dict[str, nn.Module] = {"base": base}
    for m in experts:
        variants[f"fused M={m}"] = MoELoraLinear.wrap(base, r=r, num_experts=m, alpha=alpha, dropout=dropout)
        variants[f"lora r={m * r}"] = MoELoraLinear.wrap(base, r=m * r, num_experts=1, alpha=alpha, dropout=dropout)
        variants[f"loop M={m}"] = HydraLoopLinear(base, r=r, num_experts=m, alpha=alpha, dropout=dropout)
    for i, v in enumerate(variants.values()):
        v.train()
        _randomise(v, i)
    return variants


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-out", type=int, default=1536)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--experts", default="2,4,8", help="comma-separated expert counts M")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--reps", type=int, default=150, help="timed repetitions of every variant")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: the CPUs this process may use")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    experts = [int(m) for m in args.experts.split(",")]
    base = nn.Linear(args.d_in, args.d_out, bias=False)  # SmolLM2 (LLaMA-style) MLPs have no bias
    base.requires_grad_(False)
    variants = build_variants(base, args.r, experts, args.alpha, args.dropout)
    x = torch.randn(args.batch, args.seq, args.d_in, requires_grad=True)
    grad_out = torch.randn(args.batch, args.seq, args.d_out)

    rng = random.Random(args.seed)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.warmup + args.reps):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            t = _time_step(variants[n], x, grad_out)
            if rep >= args.warmup:
                times[n].append(t)

    ms = 1e3
    base_t = times["base"]
    cost = {n: statistics.median([t - b for t, b in zip(times[n], base_t)]) for n in names if n != "base"}
    print(f"MoE-LoRA layer forward+backward: {args.d_in}->{args.d_out}, tokens {args.batch}x{args.seq}, "
          f"fp32, CPU threads {threads}, r={args.r}, dropout {args.dropout} (train), "
          f"{args.reps} interleaved reps after {args.warmup} warm-up, torch {torch.__version__}")
    q = statistics.quantiles
    print(f"{'variant':<14}{'layer ms (median)':>18}{'IQR ms':>16}{'adapter ms':>12}")
    for n in names:
        qs = q(times[n], n=4)
        extra = "" if n == "base" else f"{cost[n] * ms:12.2f}"
        print(f"{n:<14}{statistics.median(times[n]) * ms:18.2f}{f'{qs[0] * ms:.2f}-{qs[2] * ms:.2f}':>16}{extra}")
    print()
    rs = random.Random(args.seed + 1)
    n_rep = len(base_t)

    def paired_cost(name: str, idx: list[int]) -> float:
        return statistics.median([times[name][i] - base_t[i] for i in idx])

    def ratio_interval(num: str, den: str, n_boot: int = 400) -> tuple[float, float]:
        """90% bootstrap interval of the cost ratio, resampling repetitions (keeps pairs)."""
        rats = []
        for _ in range(n_boot):
            idx = [rs.randrange(n_rep) for _ in range(n_rep)]
            rats.append(paired_cost(num, idx) / paired_cost(den, idx))
        qs = statistics.quantiles(rats, n=20)
        return qs[0], qs[-1]

    print(f"{'M':>3}{'fused':>9}{'lora(M·r)':>11}{'loop':>9}{'fused/lora':>12}{'(90% CI)':>14}"
          f"{'loop/fused':>12}{'(90% CI)':>14}")
    verdicts = []
    for m in experts:
        fn, ln, pn = f"fused M={m}", f"lora r={m * args.r}", f"loop M={m}"
        f, lo, lp = cost[fn], cost[ln], cost[pn]
        (a, b), (c, d) = ratio_interval(fn, ln), ratio_interval(pn, fn)
        print(f"{m:>3}{f * ms:9.2f}{lo * ms:11.2f}{lp * ms:9.2f}{f / lo:12.2f}{f'{a:.2f}-{b:.2f}':>14}"
              f"{lp / f:12.2f}{f'{c:.2f}-{d:.2f}':>14}")
        verdicts.append(f"M={m}: fused/lora {f / lo:.2f} {'<=' if f / lo <= 1.15 else '>'} 1.15"
                        + (f", loop/fused {lp / f:.2f} {'>=' if lp / f >= 2 else '<'} 2" if m == 4 else ""))
    print("costs: adapter-only ms = layer time - base time, median over paired repetitions")
    print("targets (issue 2): fused/lora <= 1.15; loop/fused >= 2 at M=4 -> " + "; ".join(verdicts))


if __name__ == "__main__":
    main()
