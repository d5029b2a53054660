"""``floe run``, ``floe report`` and ``floe experiment`` on the command line (thin layers over :mod:`floe.pipeline`)."""
from __future__ import annotations

import argparse

from floe.flags import COMMON_FLAGS, FlagTable, add_job_command, job_from_args, shared

RUN_FLAGS: FlagTable = {
    **COMMON_FLAGS,
    **shared("--r", "--experts", "--max-train-examples", "--steps", steps="optimizer steps of the final training"),
    "--method": ("method", {"help": "the method to run, one of the methods listed above (default floe)"}),
    "--k": ("k", {"type": int, "help": "layers adapted (or trainable at a time, lisa)"}),
    "--seed": ("seed", {"type": int, "help": "seed of adapter init, data order, dropout and layer draws"}),
    "--warmup-steps": ("warmup_run.max_steps", {"type": int, "help": "optimizer steps of the warm-up (floe)"}),
    "--eval-examples": ("eval.max_examples", {"type": int, "help": "test examples evaluated"}),
    "--compare": ("compare", {"help": "methods run beside --method, comma-separated ('' for none)"}),
    "--output-dir": ("output_dir", {"help": "where run.json, the stages and the report go"}),
}


def add_run_parser(sub) -> argparse.ArgumentParser:
    from floe.pipeline.config import METHODS

    methods = "\n".join(f"  {name:<14} {what}" for name, (_, what) in METHODS.items())
    p = add_job_command(sub, "run", RUN_FLAGS, _cmd_run,
                        help="warm-up, selection, training and evaluation of a method and its baselines",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Run one method (and the methods in `compare`) from data to scores; finished "
                                    "stages are cached by the fingerprint of their inputs.\n\nmethods:\n" + methods)
    p.add_argument("config_file", nargs="?", help="YAML config (the same as --config)")
    r = sub.add_parser("report", help="compare run folders in one Markdown and one HTML file",
                       description="Read run.json of each RUN_DIR and write report.md and report.html "
                                   "(figures embedded) comparing the methods side by side.")
    r.add_argument("run_dirs", nargs="+", help="folders written by floe run")
    r.add_argument("--output", "-o", default="report", help="folder for report.md, report.html and figures")
    r.set_defaults(func=_cmd_report)
    e = sub.add_parser("experiment", help="a resumable grid of floe run cells, one results line per cell",
                       description="Run every unfinished cell of GRID.yaml (variants x k x seeds x data) one at a "
                                   "time, appending one JSON line per finished cell to the results file; "
                                   "--summary prints the tables from the results file instead.")
    e.add_argument("grid", help="grid YAML file (see benchmarks/grids/)")
    e.add_argument("--summary", action="store_true", help="print mean ± std and paired differences, run nothing")
    e.add_argument("--baseline", default="random", help="variant the paired differences are taken against")
    e.add_argument("--rerun", metavar="CELL", help="run finished CELL again from its recorded config in a fresh "
                                                   "folder and record both validation losses (reruns.jsonl)")
    e.set_defaults(func=_cmd_experiment)
    return p


def _cmd_experiment(args: argparse.Namespace) -> int:
    from floe.pipeline.experiment import finished, load_grid, run_grid, summarise

    grid = load_grid(args.grid)
    if args.summary:
        print(summarise(list(finished(grid.results_path).values()), baseline=args.baseline))
        return 0
    if args.rerun:
        from floe.pipeline.experiment import rerun_cell

        rerun_cell(grid, args.rerun)
        return 0
    run_grid(grid)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from floe.config import describe
    from floe.pipeline import RunConfig, run

    if args.config_file and not args.config:
        args.config = args.config_file
    if args.print_config:  # the config as resolved: file, flags, --set
        print("\n".join(describe(job_from_args(RunConfig, args, RUN_FLAGS))))
        return 0
    run(job_from_args(RunConfig, args, RUN_FLAGS))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from floe.pipeline.report import write_report

    for path in write_report(args.run_dirs, args.output):
        print(f"[floe] wrote {path}")
    return 0
