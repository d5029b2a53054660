"""``floe select``: rank the layers of a warm-up-adapted model and choose the critical ones.

    floe select --model smollm2-135m --adapter runs/warmup/adapter \\
        --data bigbench:natural_instructions --budget 0.5 --top-k 8 --output runs/select

writes ``selection.json`` (scores, ranking, chosen layers, per-stage diagnostics, timings, input
fingerprints), ``masks.safetensors`` (binary and tuned masks), ``layer_importance.png`` (paper
Fig. 3/10 style) and, with ``--stability``, ``stability.png`` (Fig. 7), then prints a table.
Runs data-parallel under ``torchrun``/``accelerate launch`` (the first process writes).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from floe.errors import InputError
from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args, shared
from floe.pipeline.layers import position_note
from floe.selection.api import Selection, SelectionConfig
from floe.selection.outputs import write_outputs
from floe.specs import DataSpec, ModelSpec, load_split


@dataclass
class SelectJob:
    """``floe select``: FLoE layer selection on a warm-up-adapted model."""

    model: ModelSpec = field(default_factory=ModelSpec)
    """The base model the warm-up adapter was trained on."""
    adapter_dir: str = ""
    """Folder of the warm-up (full-layer MoE-LoRA) adapter, e.g. runs/warmup/adapter."""
    data: DataSpec = field(default_factory=DataSpec)
    """Selection data (the paper uses the warm-up sample); the train split is used."""
    batch_size: int = 4
    """Examples per selection batch (one gradient per batch enters the Fisher)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Budget, top-k, mask rule, scorer, refinement/tuning options."""
    output_dir: str = "runs/select"
    """Where selection.json, masks.safetensors and the figures are written."""


def _top_k(text: str) -> int | float:
    """'8' → 8 layers; '0.25' → a quarter of the layers."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"takes a layer count (e.g. 8) or a fraction of the layers (e.g. 0.25), got {text!r}") from None


# flag → (dotted config key, argparse kwargs)
SELECT_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    **shared("--fraction"),
    "--adapter": ("adapter_dir", dict(help="warm-up adapter folder written by `floe train` (<output_dir>/adapter)")),
    "--max-examples": ("data.max_train_examples", dict(type=int, help="cap on selection examples")),
    "--batch-size": ("batch_size", dict(type=int, help="examples per selection batch")),
    "--num-batches": ("selection.num_batches", dict(type=int, help="use the first N batches (default: all)")),
    "--budget": ("selection.budget", dict(help="Taylor budget gamma in (0, 1)")),
    "--top-k": ("selection.top_k", dict(type=_top_k, help="layers to choose: a count (8) or a fraction (0.25)")),
    "--mask-rule": ("selection.mask_rule", dict(help="fisher_top (default) | paper | kwon")),
    "--scorer": ("selection.scorer", dict(help="floe | fisher | taylor | grad_norm | random | fim_variance | "
                                                "lora_drop | ablation | ablation_greedy | spectrum | cka | alpha")),
    "--refine": ("selection.refine", dict(help="paper (Alg. 2, default) | block | none")),
    "--refine-iters": ("selection.refine_iters", dict(type=int, help="cap on refinement swaps (default: none)")),
    "--refine-candidates": ("selection.refine_candidates", dict(type=int, help="refine block: K candidates per type and step")),
    "--taylor": ("selection.taylor", dict(help="weights (Eq. 4, default) | mask")),
    "--fisher": ("selection.fisher", dict(help="example (Eq. 8, default) | batch")),
    "--heldout-batches": ("selection.heldout_batches", dict(type=int, help="batches held out for the masked-loss check")),
    "--damping": ("selection.damping", dict(type=float, help="ridge damping of the tuning solve")),
    "--seed": ("selection.seed", dict(type=int, help="seed of the random scorer and stability subsamples")),
    "--output": ("output_dir", dict(help="output folder")),
}


def add_select_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``floe select`` on the ``floe`` command's sub-parsers."""
    p = add_job_command(
        subparsers, "select", SELECT_FLAGS, run_select, help="score layers with FLoE and choose the critical ones",
        description="FLoE layer selection: Taylor cost (base model) and Fisher (warm-up adapted model) of every "
                    "head and FFN neuron, mask search (Alg. 1), refinement (Alg. 2), least-squares tuning, "
                    "per-layer scores and the top-k layers.")
    p.add_argument("--stability", action="store_true", help="also rank on 100/70/30%% subsamples (Fig. 7)")
    p.add_argument("--no-refine", action="store_true", help="skip the refinement stage (same as --refine none)")
    p.add_argument("--no-tune", action="store_true", help="skip the tuning stage (score the binary masks)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


class _UsageError(InputError):
    """A bad ``floe select`` argument."""


def _job(args: argparse.Namespace) -> SelectJob:
    # a `floe train` config file works as is: its adapter hyperparameters and training section are not ours
    job = job_from_args(SelectJob, args, SELECT_FLAGS, other_commands_sections=("adapter", "train", "export_peft"))
    s = job.selection
    if getattr(args, "stability", False):
        s.stability = True
    if getattr(args, "no_refine", False):
        s.refine = "none"
    if getattr(args, "no_tune", False):
        s.tune = False
    s.progress = not getattr(args, "no_progress", False)
    if not job.adapter_dir:
        raise _UsageError("--adapter is required: the warm-up adapter folder written by `floe train`")
    if job.batch_size < 1:
        raise _UsageError(f"--batch-size must be >= 1, got {job.batch_size}")
    return job


def _init_distributed():
    """The device of this process; under torchrun/accelerate launch accelerate initialises
    torch.distributed (:func:`floe.distributed.state`)."""
    import torch

    from floe.distributed import state

    st = state()
    return st.device if torch.cuda.is_available() else torch.device("cpu")


def format_table(sel: Selection) -> str:
    """A readable per-layer table (in layer order) and the chosen layers."""
    rank_of = {layer: r for r, layer in enumerate(sel.ranking)}
    chosen = set(sel.chosen)
    g = sel.geometry
    columns = [(f"{'layer':>5}", lambda i: f"{i:>5}"), (f"{'rank':>4}", lambda i: f"{rank_of[i]:>4}"),
               (f"{'score':>9}", lambda i: f"{sel.scores[i]:>9.4f}")]  # (header, cell of layer i)
    if sel.untuned_scores is not None:
        columns.append((f"{'untuned':>9}", lambda i: f"{sel.untuned_scores[i]:>9.4f}"))
    if sel.heads_masked is not None:
        columns.append((f"{'heads':>7} {'neurons':>9}",
                        lambda i: f"{sel.heads_masked[i]:>3}/{g.get('num_heads', 0):<3} "
                                  f"{sel.neurons_masked[i]:>4}/{g.get('num_neurons', 0):<4}"))
    if sel.fisher_share is not None:
        columns.append((f"{'fisher%':>8}", lambda i: f"{100 * sel.fisher_share[i]:>7.2f}%"))
    lines = [" ".join(head for head, _ in columns) + "  chosen"]
    lines += [" ".join(cell(i) for _, cell in columns) + ("  *" if i in chosen else "") for i in range(sel.num_layers)]
    lines.append(f"scorer {sel.scorer}; chosen layers (rank order): {sel.chosen}")
    note = position_note(sel.chosen, sel.num_layers)
    if note:
        lines.append(note)
    for stage in ("determination", "refinement", "tuning"):
        d = sel.diagnostics.get(stage)
        if not isinstance(d, dict) or "ranking" not in d:
            continue
        rho = d.get("rank_correlation")
        loss = d.get("loss_increase") or {}
        lines.append(f"{stage}: {d['constrained']} cost {d['cost']:.4g} <= C {d['budget']:.4g}: "
                     f"{'yes' if d['fits_budget'] else 'NO'}; rank corr. with previous stage "
                     f"{'-' if rho is None else f'{rho:.3f}'}; true masked-loss increase "
                     + ", ".join(f"{k} {v:+.4f}" for k, v in loss.items()))
    if sel.heads_masked is not None:
        lines.append("heads/neurons: masked units per layer (m = 0)")
    return "\n".join(lines)


def run_select(args: argparse.Namespace) -> int:
    """Entry point of ``floe select`` (returns the exit status)."""
    from floe.config import describe

    if getattr(args, "print_config", False):
        print("\n".join(describe(_job(args))))  # the job as resolved: file, flags, --set
        return 0
    return _run(_job(args))  # input errors (InputError) are reported by floe.cli.main


def _run(job: SelectJob) -> int:
    from floe.adapters.moe_lora import read_adapter_config
    from floe.builtin_models import ModelUnavailableError
    from floe.config import to_dict
    from floe.data import DataCollator, iter_batches
    from floe.distributed import rank_and_world, wait_for_everyone
    from floe.models import load_model
    from floe.selection.api import select_layers

    adapter_dir = Path(job.adapter_dir)
    if not adapter_dir.is_dir():
        raise _UsageError(f"adapter folder {adapter_dir} does not exist; pass the folder written by "
                          "`floe train` (<output_dir>/adapter)")
    adapter_cfg = read_adapter_config(adapter_dir)  # AdapterError when it is not an adapter folder
    device = _init_distributed()
    rank, world = rank_and_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        model, tokenizer = load_model(job.model.name, dtype=job.model.dtype, device=device)
    except ModelUnavailableError as e:
        raise _UsageError(str(e)) from e
    if adapter_cfg.base_model_name_or_path not in (None, job.model.name):
        say(f"[floe] note: the adapter was trained on {adapter_cfg.base_model_name_or_path!r}, "
            f"selecting on {job.model.name!r} (shapes are checked)")
    d = job.data
    dataset = load_split(d, tokenizer, "train", d.max_train_examples)
    batches = list(iter_batches(dataset, job.batch_size, DataCollator(tokenizer)))
    say(f"[floe] {len(dataset)} examples in {len(batches)} batches of {job.batch_size}"
        + (f" on {world} processes" if world > 1 else ""))
    sel = select_layers(model, adapter_dir, batches, job.selection)
    sel.fingerprints["job"] = to_dict(job)
    if rank == 0:
        written = write_outputs(sel, Path(job.output_dir), title=f"{job.model.name} · {d.source}")
        print(format_table(sel))
        t = sel.timings
        print("[floe] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
        for fb in sel.diagnostics.get("tuning_fallbacks", []):
            print(f"[floe] tuning fallback: {fb}")
        print("[floe] wrote " + ", ".join(str(p) for p in written))
    wait_for_everyone()
    return 0
