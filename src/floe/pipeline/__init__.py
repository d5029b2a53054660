"""``floe run``: one command from data to a report, with every baseline one config value away."""
from floe.pipeline.config import METHODS, RunConfig, SelectSpec, WarmupSpec
from floe.pipeline.runner import run

__all__ = ["METHODS", "RunConfig", "SelectSpec", "WarmupSpec", "run"]
