"""``floe search``: rank / expert-count search with Optuna (resumable, parallel workers)."""
from __future__ import annotations

import argparse
import signal
import sys
from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args, shared

DESCRIPTION = """Bayesian optimisation (Optuna TPE) of the LoRA rank r and the number of experts M:
each trial trains MoE-LoRA for --steps steps and its validation loss is the objective; a pruner
stops hopeless trials, repeated (r, M) reuse the cached result, failed trials (NaN, out of memory)
are recorded and the search goes on. The study lives in --output/search.db (SQLite): run the same
command again to resume a killed search. With --storage <SQLAlchemy URL> (e.g. postgresql://...)
and --study-name, several workers on several machines share one study: start the same command on
each. Writes search.json, search.png (trial value vs trial, running best), search_contour.png
(validation loss over r and M) and prints a table."""

EPILOG = """Example: floe search --model smollm2-135m --data bigbench:natural_instructions --trials 30
--steps 60 --output runs/search. Every key of the job (floe search --print-config) can be set in
a YAML file (--config; a floe train config works: its model, data, adapter and train sections
mean the same) or with --set key.path=value."""


# flag -> (dotted key of SearchJob, argparse kwargs)
SEARCH_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    **shared("--fraction", "--max-train-examples", "--max-eval-examples", "--layers", "--alpha", "--targets", "--steps",
             "--batch-size", "--lr", layers="decoder layers to adapt: 'all' (default, as the paper) or e.g. '0,3,5-7'",
             steps="training steps per trial (default 100)", batch_size="examples per step"),
    "--bf16": ("train.bf16", dict(action="store_const", const=True, help="train under bfloat16 autocast")),
    "--eval-points": ("eval_points", dict(type=int, help="validation losses per trial, evenly spaced (default 4)")),
    "--trials": ("search.n_trials", dict(type=int, help="finished trials the study ends with (default 30)")),
    "--r-min": ("search.r_min", dict(type=int, help="smallest rank (default 2)")),
    "--r-max": ("search.r_max", dict(type=int, help="largest rank (default 32)")),
    "--r-step": ("search.r_step", dict(type=int, help="rank step (default 2)")),
    "--experts": ("search.experts", dict(help="candidate numbers of experts, comma-separated (default 2,3,4)")),
    "--sampler": ("search.sampler", dict(choices=["tpe", "random"], help="tpe (default) or random")),
    "--startup-trials": ("search.n_startup_trials", dict(type=int, help="random trials before TPE models (default 10)")),
    "--pruner": ("search.pruner", dict(choices=["none", "median", "halving"], help="early stopping of trials (default median)")),
    "--seed": ("search.seed", dict(type=int, help="sampler seed (default 0)")),
    "--storage": ("storage", dict(help="Optuna storage URL shared by workers (default sqlite:///<output>/search.db)")),
    "--study-name": ("study_name", dict(help="study name inside the storage (default floe-search)")),
    "--output": ("output_dir", dict(help="folder for search.json, search.png and search.db (default runs/search)")),
}


def add_search_parser(subparsers) -> argparse.ArgumentParser:  # type: ignore[no-untyped-def]
    """Register ``floe search`` on an ``argparse`` sub-parser collection."""
    return add_job_command(subparsers, "search", SEARCH_FLAGS, run_search,
                           help="Bayesian search of the LoRA rank r and expert count M",
                           description=DESCRIPTION, epilog=EPILOG)


def _raise_keyboard_interrupt(signum, frame):  # type: ignore[no-untyped-def]
    raise KeyboardInterrupt(f"signal {signum}")


def install_sigterm_handler() -> None:
    """Turn SIGTERM (e.g. a batch scheduler's stop) into KeyboardInterrupt, so the running trial
    is closed as interrupted (not counted) and queued again for the next run."""
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def _quiet_progress_bars() -> None:
    """No "Loading weights" bars on stderr: the command's own lines say what it loads, and an
    error stays the only line on stderr."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def run_search(args: argparse.Namespace, log=print) -> int:  # type: ignore[no-untyped-def]
    """``floe search``: 0 when the study is done, 1 when no trial completed, 2 on bad input,
    130 when interrupted (run the same command again to resume)."""
    from floe.config import describe
    from floe.search.job import SearchJob, run_search_job

    if getattr(args, "print_config", False):
        print("\n".join(describe(job_from_args(SearchJob, args, SEARCH_FLAGS))))  # as resolved
        return 0
    install_sigterm_handler()
    _quiet_progress_bars()
    try:  # input errors (floe.errors.InputError) are reported by floe.cli.main, the one handler
        job = job_from_args(SearchJob, args, SEARCH_FLAGS)
        result = run_search_job(job, log=log)
    except KeyboardInterrupt:
        print("floe search: interrupted; finished trials are saved in the study; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    if result.best is None:
        print("floe search: no trial completed (see the failures above)", file=sys.stderr)
        return 1
    return 0
