"""``floe run`` / :func:`floe.run`: [search →] warm-up → layer selection → training → evaluation → run.json.

:func:`run` reads top to bottom: each stage is a method of :class:`_Run` that takes what it needs
and returns what it made. Each stage is cached by the fingerprint of its inputs (:mod:`floe.pipeline.stages`): the same
config skips finished stages, a killed training resumes from its checkpoint, and a changed field
re-runs exactly the stages downstream of it. Methods in ``compare`` run beside ``method`` on the
same data, split, seed and steps, so the run ends with a like-for-like comparison.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

from floe.adapters.moe_lora import apply_moe_lora, load_adapter
from floe.adapters.moe_lora.config import fingerprint_form
from floe.arch import text_config
from floe.checkpoints import NEUTRAL_KEYS
from floe.config import to_dict
from floe.io import atomic_write_text
from floe.pipeline import layers as L
from floe.pipeline.config import METHODS, RunConfig
from floe.pipeline.stages import Stage, run_stage
from floe.pipeline.summary import format_summary, headline
from floe.provenance import package_versions

Log = Callable[[str], None]


class _Run:
    """What every stage of one run shares: the config, the tokenizer, the splits, the stage root.

    The model's weights are loaded only by the stages that run it (once each); here the tokenizer and
    the model's config (its layer count) are enough."""

    def __init__(self, cfg: RunConfig, log: Log) -> None:
        from floe.models import load_tokenizer
        from floe.specs import load_splits

        self.cfg, self.log = cfg, log
        self.tokenizer, model_config = load_tokenizer(cfg.model.name)  # input errors surface here
        self.num_layers = int(text_config(model_config).num_hidden_layers)
        for method in self.methods:
            if METHODS[method][0]:
                L.check_k(cfg.k, self.num_layers)
        self.train_ds, self.val_ds = load_splits(cfg.data, self.tokenizer)
        log(f"[floe] data {cfg.data.source}: {len(self.train_ds)} training / {len(self.val_ds)} validation examples "
            f"(after skipping over-long ones); {self.num_layers} decoder layers")
        self.root = Path(cfg.stage_root or Path(cfg.output_dir) / "stages")
        self.trained: dict[str, Any] = {}  # method (or "method/best") → its model, trained or loaded in this process
        self.stages: dict[str, dict[str, Any]] = {}  # "method/stage" → what run.json records
        self.searched: dict[str, int] = {}  # r and num_experts of the search stage, set by run() when enabled
        self.search_stage: Stage | None = None
        self.common = {"model": to_dict(cfg.model), "data": to_dict(cfg.data), "seed": cfg.seed,
                       "adapter": {k: v for k, v in fingerprint_form(to_dict(cfg.adapter)).items()
                                   if k not in ("layers", "base_model_name_or_path")},
                       "train": {k: v for k, v in to_dict(cfg.train).items() if k not in NEUTRAL_KEYS | {"seed"}}}

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys([self.cfg.method, *self.cfg.compare]))

    def base_model(self):
        """A fresh base model: each stage that runs the model loads it once."""
        from floe.models import load_model

        return load_model(self.cfg.model.name, dtype=self.cfg.model.dtype)[0]

    @property
    def sample_data(self):
        """The data spec of the warm-up sample: ``warmup_run.fraction`` of the training split."""
        return dataclasses.replace(self.cfg.data, fraction=self.cfg.warmup_run.fraction)

    @functools.cached_property
    def sample(self) -> tuple[Any, Any]:
        """(train, validation) of the warm-up sample, which the search and the warm-up train on."""
        from floe.specs import load_splits

        return load_splits(self.sample_data, self.tokenizer)

    @property
    def adapter(self):
        """The adapter settings the final training uses: the config's, or the searched r and M; the
        adapter records the model as the config names it (not the folder it was loaded from)."""
        return dataclasses.replace(self.cfg.adapter, base_model_name_or_path=self.cfg.model.name, **self.searched)

    def attach(self, model, layers: list[int] | None):
        """MoE-LoRA on ``layers`` of ``model`` (None: all), initialised from the run's seed: the PeftModel."""
        return apply_moe_lora(model, dataclasses.replace(self.adapter, layers_to_transform=layers), seed=self.cfg.seed)

    def searched_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """A training stage's cache key with the r and M it trains with: the searched pair replaces the config's
        (and the search stage is named), so a run with the search on never reuses one trained without it."""
        if not self.searched:
            return inputs
        return {**inputs, "adapter": {**inputs["adapter"], **self.searched}, "search": self.search_stage.fingerprint}

    def total_steps(self) -> int:
        """Optimizer steps of the final training (AdaLoRA's schedule needs them up front)."""
        t = self.cfg.train
        if t.max_steps > 0:
            return t.max_steps
        per_epoch = -(-len(self.train_ds) // (t.batch_size * t.gradient_accumulation_steps))
        return max(1, int(per_epoch * t.num_epochs))

    def train_config(self, folder: Path, **overrides):
        return dataclasses.replace(self.cfg.train, output_dir=str(folder), seed=self.cfg.seed, overwrite=False,
                                   resume=True, **overrides)

    # ------------------------------------------------------------------ stages

    def warmup(self) -> Stage:
        """The warm-up run: full-layer MoE-LoRA on the sample (paper §3.1); its adapter is what selection reads."""
        from floe.training import train

        # "warmup" in the cache key is the section's old name: recorded stages keep their fingerprints
        stage = Stage("warmup", self.searched_inputs({**self.common, "warmup": to_dict(self.cfg.warmup_run)}),
                      self.root)

        def work(folder: Path) -> dict[str, Any]:
            train_ds, val_ds = self.sample
            model = self.attach(self.base_model(), None)
            res = train(model, self.tokenizer, train_ds, val_ds,
                        self.train_config(folder, max_steps=self.cfg.warmup_run.max_steps, num_epochs=1.0))
            return {"examples": len(train_ds), "final_eval_loss": res.final_eval_loss, "steps": res.steps,
                    "train_seconds": res.train_seconds}

        self.record("warmup", *run_stage(stage, work, self.log))
        return stage

    def select(self, warm: Stage) -> list[int]:
        """FLoE's layer selection on the warm-up adapter (paper §3.2-3.3): the k chosen layers."""
        from floe.data import DataCollator, iter_batches
        from floe.selection import select_layers
        from floe.selection.outputs import write_outputs
        from floe.specs import load_split

        spec = self.cfg.select
        stage = Stage("select", {"warmup": warm.fingerprint, "select": to_dict(spec), "k": self.cfg.k}, self.root)

        def work(folder: Path) -> dict[str, Any]:
            d = self.cfg.data
            ds = load_split(self.sample_data, self.tokenizer, "train", spec.max_examples)
            batches = list(iter_batches(ds, spec.batch_size, DataCollator(self.tokenizer)))
            sel = select_layers(self.base_model(), warm.dir / "adapter", batches,
                                dataclasses.replace(spec.config, top_k=self.cfg.k))
            write_outputs(sel, folder, title=f"{self.cfg.model.name} · {d.source}")
            return {"chosen": sel.chosen, "ranking": sel.ranking, "scores": sel.scores, "timings": sel.timings}

        record, cached = run_stage(stage, work, self.log)
        self.record("select", record, cached)
        chosen = list(record["result"]["chosen"])
        note = L.position_note(chosen, self.num_layers)
        if note:
            self.log(f"[floe] {note}")
        return chosen

    def train(self, method: str, layers: list[int] | None) -> Stage:
        from floe.pipeline.baselines import PEFT_METHODS, PROMPT_METHODS, trainable_counts
        from floe.training import train

        lisa = method == "lisa"
        inputs = {**self.common, "layers": L.train_key(layers, self.num_layers),
                  **({"lisa": [self.cfg.k, self.cfg.lisa_interval]} if lisa else {}),
                  **({"peft": method} if method in PEFT_METHODS else {}),
                  **({"virtual_tokens": self.cfg.virtual_tokens} if method in PROMPT_METHODS else {}),
                  **({"full": True} if method == "full" else {})}
        allocation = self.allocate() if method == "fim_lora" else None
        if allocation is not None:
            inputs["allocation"] = allocation.fingerprint
        stage = Stage("train", self.searched_inputs(inputs), self.root)

        def work(folder: Path) -> dict[str, Any]:
            model, callbacks = self.prepare(self.base_model(), method, layers, allocation)
            adapter, total = trainable_counts(model)
            per_step = adapter * self.cfg.k // self.num_layers if lisa else adapter
            self.log(f"[floe] {method}: {per_step:,} trainable of {total:,} parameters ({100 * per_step / total:.3f}%)"
                     + (f" at a time ({adapter:,} adapter parameters in all)" if lisa else ""))
            res = train(model, self.tokenizer, self.train_ds, self.val_ds, self.train_config(folder), callbacks,
                        full=method == "full")
            self.trained[method] = model
            return {"train": res.to_dict(), "layers": layers, "trainable_params": per_step, "adapter_params": adapter,
                    "total_params": total, "lisa_draws": callbacks[0].history if lisa else None}

        self.record(f"{method}/train", *run_stage(stage, work, self.log, f"{method}/train"))
        return stage

    def prepare(self, model, method: str, layers: list[int] | None, allocation: Stage | None) -> tuple[Any, list]:
        """``method``'s adapter on ``model`` (its PeftModel; ``full``: the model, unfrozen) and the callbacks its
        training needs."""
        from floe.pipeline.baselines import PEFT_METHODS, AdaLoraSchedule, attach_peft, unfreeze_all
        from floe.pipeline.lisa import LisaCallback

        if method == "full":
            unfreeze_all(model)
            return model, []
        if method in PEFT_METHODS:
            alloc = json.loads((allocation.dir / "allocation" / "adapter_config.json").read_text()) if allocation else None
            peft = attach_peft(model, method, self.adapter, layers, self.total_steps(), self.cfg.seed,
                               virtual_tokens=self.cfg.virtual_tokens, allocation=alloc)
            return peft, [AdaLoraSchedule(peft)] if method == "adalora" else []
        peft = self.attach(model, layers)
        return peft, [LisaCallback(peft, self.cfg.k, self.cfg.lisa_interval, self.cfg.seed)] if method == "lisa" else []

    def allocate(self) -> Stage:
        """FIM-LoRA (docs/fim-lora.md): per-matrix ranks of average r from calibration gradients on the base model."""
        from floe.allocate import AllocateConfig, allocate_ranks, save_allocation
        from floe.data import DataCollator, iter_batches

        a = self.adapter
        config = AllocateConfig(budget_rank=a.r, target_modules=tuple(a.target_modules), num_passes=self.cfg.fim_passes,
                                lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, seed=self.cfg.seed)
        stage = Stage("allocate", {"model": self.common["model"], "data": self.common["data"], "seed": self.cfg.seed,
                                   "batch_size": self.cfg.train.batch_size, "config": to_dict(config)}, self.root)

        def work(folder: Path) -> dict[str, Any]:
            batches = iter_batches(self.train_ds, self.cfg.train.batch_size, DataCollator(self.tokenizer))
            alloc = allocate_ranks(self.base_model(), batches, config)
            save_allocation(alloc, folder / "allocation")
            return {"ranks": alloc.rank_by_name, "total_rank": alloc.total_rank, "seconds": alloc.seconds}

        self.record("fim_lora/allocate", *run_stage(stage, work, self.log, "fim_lora/allocate"))
        return stage

    def search(self) -> tuple[Stage, dict[str, int]]:
        """Bayesian search of (r, M) on full-layer MoE-LoRA over the warm-up sample (paper §3.4, docs/search.md):
        the stage and the best pair, which replaces ``adapter.r`` and ``adapter.num_experts`` of every method
        trained after it (:func:`run` sets it)."""
        from floe.search import make_training_objective, search_rank

        spec = self.cfg.search
        stage = Stage("search", {**self.common, "fraction": self.cfg.warmup_run.fraction, "search": to_dict(spec)},
                      self.root)

        def work(folder: Path) -> dict[str, Any]:
            train_ds, val_ds = self.sample
            objective = make_training_objective(
                self.base_model, self.tokenizer, train_ds, val_ds,
                dataclasses.replace(self.train_config(folder), max_steps=spec.steps),
                adapter=dataclasses.replace(self.cfg.adapter, layers_to_transform=None), eval_points=spec.eval_points)
            result = search_rank(objective, self.cfg.search_config(), output_dir=folder / "study",
                                 context={"search_stage": stage.fingerprint}, log=self.log)
            if result.best is None:
                from floe.search import SearchError

                raise SearchError(f"the search finished no trial (see {folder / 'study'}); check its log")
            return {"r": result.best.r, "num_experts": result.best.num_experts, "value": result.best.value,
                    "trials": len(result.trials)}

        record, cached = run_stage(stage, work, self.log)
        self.record("search", record, cached)
        return stage, {"r": int(record["result"]["r"]), "num_experts": int(record["result"]["num_experts"])}

    def trained_model(self, method: str, trained: Stage, which: str = "final"):
        """The model ``method`` trained, with its final adapter (kept in memory when trained in this process)
        or its best one (``train.keep_best``: the lowest validation loss), loaded from the stage folder."""
        from floe.pipeline.baselines import PEFT_METHODS
        from floe.training import BEST_DIR

        key = method if which == "final" else f"{method}/{which}"
        if key in self.trained:  # trained in this process, or loaded for an earlier stage (eval, then retention)
            return self.trained[key]
        folder = trained.dir / (BEST_DIR if which == "best" else "model" if method == "full" else "adapter")
        model = self.base_model()
        if method == "full":
            from floe.checkpoints import load_full_weights

            load_full_weights(model, folder)
        elif method in PEFT_METHODS:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder))
        else:
            model = load_adapter(model, folder)
        self.trained[key] = model
        return model

    def evaluate(self, method: str, trained: Stage, which: str = "final") -> dict[str, Any]:
        """Test-split scores of ``method``'s final (or best) adapter."""
        from floe.evaluation import evaluate
        from floe.pipeline.baselines import for_evaluation

        stage = Stage("eval", {"train": trained.fingerprint, "eval": to_dict(self.cfg.eval),
                               "data": to_dict(self.cfg.data), **({"adapter": which} if which != "final" else {})},
                      self.root)

        def work(folder: Path) -> dict[str, Any]:
            model = self.trained_model(method, trained, which)
            result = evaluate(for_evaluation(model, method), self.tokenizer, self.cfg.data.source, self.cfg.eval,
                              data=self.cfg.data)
            atomic_write_text(folder / "eval.json", json.dumps(result, indent=2, default=str) + "\n")
            return headline(result)

        name = f"{method}/eval" + ("" if which == "final" else f"_{which}")
        record, cached = run_stage(stage, work, self.log, name)
        self.record(name, record, cached)
        return record["result"]

    def retention_base(self) -> dict[str, Any]:
        """Retention accuracy of the base model (docs/evaluation.md, "Retention"); one stage per model and tasks."""
        from floe.evaluation.retention import evaluate_retention

        stage = Stage("retention", {"model": self.common["model"], "retention": to_dict(self.cfg.retention)},
                      self.root)

        def work(folder: Path) -> dict[str, Any]:
            return evaluate_retention(self.base_model(), self.tokenizer, self.cfg.retention)

        record, cached = run_stage(stage, work, self.log, "base/retention")
        self.record("base/retention", record, cached)
        return record["result"]

    def retention(self, method: str, trained: Stage, which: str) -> dict[str, Any]:
        """Retention accuracy of ``method``'s adapter and its change against the base model."""
        from floe.evaluation.retention import evaluate_retention, retention_delta
        from floe.pipeline.baselines import for_evaluation

        base = self.retention_base()
        stage = Stage("retention", {"train": trained.fingerprint, "adapter": which,
                                    "retention": to_dict(self.cfg.retention)}, self.root)

        def work(folder: Path) -> dict[str, Any]:
            model = self.trained_model(method, trained, which)
            return evaluate_retention(for_evaluation(model, method), self.tokenizer, self.cfg.retention)

        record, cached = run_stage(stage, work, self.log, f"{method}/retention")
        self.record(f"{method}/retention", record, cached)
        after = record["result"]
        return {"adapter": which, "base": base, "after": after, "delta": retention_delta(after, base)}

    # ------------------------------------------------------------------ bookkeeping

    def record(self, name: str, record: dict[str, Any], cached: bool) -> None:
        self.stages[name] = {"dir": str(self.root / f"{record['name']}-{record['fingerprint']}"), "cached": cached,
                             "seconds": record["seconds"], "peak_memory_mb": record["peak_memory_mb"],
                             "result": record["result"]}


def run(config: RunConfig, log: Log = print) -> dict[str, Any]:
    """Run ``config`` end to end (finished stages are skipped) and write ``<output_dir>/run.json``."""
    from floe.pipeline.stages import fingerprint

    r = _Run(config, log)
    if config.search.enabled:
        r.search_stage, r.searched = r.search()
    methods: dict[str, Any] = {}
    for method in r.methods:
        layers = r.select(r.warmup()) if method == "floe" else L.fixed_layers(method, r.num_layers, config.k, config.seed)
        trained = r.train(method, layers)
        scores = r.evaluate(method, trained)
        t = r.stages[f"{method}/train"]["result"]
        best = None
        if t["train"].get("best_step") is not None:  # train.keep_best: the lowest-validation-loss adapter too
            best = {"step": t["train"]["best_step"], "eval_loss": t["train"]["best_eval_loss"],
                    "scores": r.evaluate(method, trained, "best")}
        retention = r.retention(method, trained, "best" if best else "final") if config.retention.enabled else None
        methods[method] = {"layers": layers, "trainable_params": t["trainable_params"],
                           "total_params": t["total_params"],
                           "trainable_share": t["trainable_params"] / t["total_params"],
                           "final_eval_loss": t["train"]["final_eval_loss"],
                           "eval_losses": t["train"]["eval_losses"], "train_seconds": t["train"]["train_seconds"],
                           "seconds_per_step": t["train"]["seconds_per_step"], "steps": t["train"]["steps"],
                           "peak_memory_mb": r.stages[f"{method}/train"]["peak_memory_mb"],
                           "scores": scores, "best": best, "retention": retention}
    summary = {"config": to_dict(config), "fingerprint": fingerprint(to_dict(config)), "method": config.method,
               "methods": methods, "stages": r.stages, "num_layers": r.num_layers, "versions": package_versions()}
    atomic_write_text(Path(config.output_dir) / "run.json", json.dumps(summary, indent=2, default=str) + "\n")
    log("\n" + format_summary(summary))  # on its own line after a progress bar's carriage return
    return summary
