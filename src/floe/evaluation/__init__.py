"""Evaluation: held-out loss/perplexity, greedy-generation exact match and ROUGE-L, multiple-choice
accuracy with its chance level, and an optional lm-evaluation-harness bridge (``floe eval``)."""
from .api import EvalConfig, EvalInputError, evaluate, format_summary
from .metrics import MissingDependencyError, chance_level, exact_match, macro_average, normalize, rouge_l

__all__ = ["EvalConfig", "EvalInputError", "MissingDependencyError", "chance_level", "evaluate", "exact_match",
           "format_summary", "macro_average", "normalize", "rouge_l"]
