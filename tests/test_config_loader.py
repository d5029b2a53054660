"""floe.config.from_dict: a nested section starts from the default its parent declares for it.

A parent may give a section other defaults than the section's class (``RunConfig.eval`` is
``EvalConfig(split="test", max_examples=120, max_new_tokens=32)``); giving one key of that section
must keep the parent's other defaults, and the section's own checks must still run.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from floe.config import ConfigError, from_dict


@dataclass
class Child:
    a: int = 1
    """A number (>= 0)."""
    b: str = "x"
    """A name."""
    c: list[int] = field(default_factory=list)
    """Some numbers."""

    def __post_init__(self) -> None:
        if self.a < 0:
            raise ValueError(f"a must be >= 0, got {self.a}")


@dataclass
class Parent:
    child: Child = field(default_factory=lambda: Child(a=5, b="parent"))
    """A section whose defaults the parent sets."""
    plain: Child = field(default_factory=Child)
    """A section with its class defaults."""
    maybe: Child | None = None
    """An optional section."""
    n: int = 0
    """A plain key."""


@dataclass
class Outer:
    inner: Parent = field(default_factory=lambda: Parent(child=Child(a=7, b="outer")))
    """A section whose own section has defaults set from two levels up."""


def test_a_key_given_in_a_section_keeps_the_other_defaults_its_parent_declares():
    got = from_dict(Parent, {"child": {"c": [1, 2]}})
    assert got.child == Child(a=5, b="parent", c=[1, 2])


def test_given_keys_win_over_the_parents_defaults():
    assert from_dict(Parent, {"child": {"b": "given", "a": 0}}).child == Child(a=0, b="given")


def test_an_absent_section_is_the_parents_default_and_a_plain_one_its_class_default():
    got = from_dict(Parent, {"n": 3})
    assert got.child == Child(a=5, b="parent") and got.plain == Child() and got.maybe is None
    assert from_dict(Parent, {"plain": {"b": "y"}}).plain == Child(a=1, b="y")
    assert from_dict(Parent, {"maybe": {"a": 2}}).maybe == Child(a=2)


def test_the_parents_defaults_reach_through_two_levels():
    assert from_dict(Outer, {"inner": {"child": {"c": [3]}}}).inner.child == Child(a=7, b="outer", c=[3])
    assert from_dict(Outer, {"inner": {"n": 1}}).inner.child == Child(a=7, b="outer")


def test_the_sections_checks_still_run_on_the_merged_values():
    with pytest.raises(ConfigError, match="a must be >= 0"):
        from_dict(Parent, {"child": {"a": -1}})
    with pytest.raises(ConfigError, match=r"child\.a: expected an integer"):
        from_dict(Parent, {"child": {"a": "many"}})
    with pytest.raises(ConfigError, match="unknown config key 'child.d'"):
        from_dict(Parent, {"child": {"d": 1}})


def test_each_result_has_its_own_lists():
    first, second = from_dict(Parent, {"child": {"b": "p"}}), from_dict(Parent, {"child": {"b": "q"}})
    first.child.c.append(1)
    assert second.child.c == [] and Parent().child.c == []


def test_run_config_keeps_its_evaluation_defaults_when_one_eval_key_is_given():
    from floe.pipeline.config import RunConfig

    default = RunConfig().eval
    got = from_dict(RunConfig, {"eval": {"max_examples": 61}}).eval
    assert (got.split, got.max_examples, got.max_new_tokens) == ("test", 61, 32)
    assert got.max_new_tokens == default.max_new_tokens != type(default)().max_new_tokens


def test_search_job_keeps_its_training_defaults_when_one_train_key_is_given():
    from floe.search.job import SearchJob

    got = from_dict(SearchJob, {"train": {"max_steps": 40}}).train
    assert (got.max_steps, got.report_to, got.progress_bar) == (40, [], False)


def test_floe_eval_keeps_its_data_defaults_when_the_file_gives_data_keys(tmp_path):
    from floe.cli import build_parser
    from floe.evaluation.cli import EVAL_FLAGS, EvalJob
    from floe.flags import job_from_args

    cfg = tmp_path / "eval.yaml"
    cfg.write_text("data:\n  max_per_task: 5\n")
    args = build_parser().parse_args(["eval", "--config", str(cfg), "--set", "data.seed=3"])
    data = job_from_args(EvalJob, args, EVAL_FLAGS).data  # the loader alone, without floe eval's own fix-ups
    assert (data.max_per_task, data.seed, data.on_error, data.truncate_prompt) == (5, 3, "skip", True)
    args = build_parser().parse_args(["eval", "--config", str(cfg), "--set", "data.on_error=raise"])
    assert job_from_args(EvalJob, args, EVAL_FLAGS).data.on_error == "raise"
