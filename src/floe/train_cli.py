"""``floe train``: MoE-LoRA fine-tuning on the chosen layers (a thin layer over :func:`floe.jobs.run_train`)."""
from __future__ import annotations

import argparse

from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args, shared

TRAIN_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    **shared("--max-train-examples", "--max-eval-examples", "--fraction", "--layers", "--r", "--experts", "--alpha",
             "--targets", "--steps", "--batch-size", "--lr",
             steps="optimizer steps (overrides --epochs)"),
    "--dropout": ("adapter.lora_dropout", dict(type=float, help="adapter input dropout")),
    "--epochs": ("train.num_epochs", dict(type=float, help="passes over the training data")),
    "--grad-accum": ("train.gradient_accumulation_steps", dict(type=int, help="gradient accumulation steps")),
    "--seed": ("train.seed", dict(type=int, help="random seed")),
    "--output-dir": ("train.output_dir", dict(help="where checkpoints, logs and the adapter go")),
    "--eval-steps": ("train.eval_steps", dict(type=int, help="evaluate every N steps (0: start and end only)")),
}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``floe train`` on the ``floe`` command's sub-parsers."""
    p = add_job_command(subparsers, "train", TRAIN_FLAGS, run_train_command,
                        help="fine-tune MoE-LoRA adapters on chosen layers",
                        description="Fine-tune a causal LM with MoE-LoRA adapters on a chosen set of decoder layers, "
                                    "save the adapter (and optionally export a PEFT LoRA adapter).")
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast")
    p.add_argument("--export-peft", action="store_true", help="also write a PEFT LoRA adapter (needs --experts 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete an earlier run in --output-dir (checkpoints, adapter, metrics) and start afresh")
    return p


def job_from(args: argparse.Namespace):
    """The :class:`floe.jobs.TrainJob` of the command line (config file, flags, --set, switches)."""
    from floe.jobs import TrainJob

    job = job_from_args(TrainJob, args, TRAIN_FLAGS)
    if getattr(args, "bf16", False):
        job.train.bf16 = True
    if getattr(args, "export_peft", False):
        job.export_peft = True
    if getattr(args, "overwrite", False):
        job.train.overwrite = True
    return job


def run_train_command(args: argparse.Namespace) -> int:
    """Entry point of ``floe train`` (input errors are reported by ``floe.cli.main``, the one handler)."""
    from floe import jobs
    from floe.config import describe

    if args.print_config:
        print("\n".join(describe(job_from(args))))  # the job as resolved: file, flags, --set
        return 0
    jobs.run_train(job_from(args))
    return 0
