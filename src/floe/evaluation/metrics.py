"""Pure metric functions: exact match, ROUGE-L, multiple-choice chance level, macro average.

Text normalisation for exact match (:func:`normalize`): strip leading/trailing whitespace and
collapse every run of whitespace (spaces, tabs, newlines) into one space. Nothing else: case,
punctuation and articles are kept, so ``"Paris."`` does not match ``"paris"``.

ROUGE-L is the F-measure of ``rouge-score`` (Google's reference implementation, the package
Super-NaturalInstructions and most NI papers use) over a Unicode-aware tokenisation
(:class:`UnicodeTokenizer`: lowercase, then runs of letters/digits/underscore), because the
package's default tokenizer drops every non-ASCII character (a French or Russian answer would
score 0 against itself). No stemming.

With several references, both take the maximum over references (as BIG-bench and Super-NI do).
"""
from __future__ import annotations

import math
import re
from typing import Mapping, Sequence

from floe.errors import InputError


class MissingDependencyError(InputError):
    """An optional package that a metric needs is not installed."""


def normalize(text: str) -> str:
    """Strip and collapse whitespace: ``"  a \\n b "`` -> ``"a b"`` (case and punctuation kept)."""
    return " ".join(text.split())


def _as_list(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference (see :func:`normalize`), else 0.0."""
    pred = normalize(prediction)
    return float(any(pred == normalize(r) for r in _as_list(references)))


class UnicodeTokenizer:
    """Lowercase, then ``\\w+`` runs (Unicode letters, digits, underscore); a ``rouge_score`` tokenizer."""

    _word = re.compile(r"\w+", re.UNICODE)

    def tokenize(self, text: str) -> list[str]:
        return self._word.findall(text.lower())


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:
        try:
            from rouge_score import rouge_scorer
        except ImportError as err:
            raise MissingDependencyError(
                "ROUGE-L needs the 'rouge-score' package, which is not installed. "
                "Fix: pip install rouge-score (it is a dependency of floe; reinstall floe).") from err
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=UnicodeTokenizer())
    return _SCORER


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (``rouge_score``, LCS of tokens), max over references; in [0, 1]."""
    scorer = _scorer()
    return max(scorer.score(r, prediction)["rougeL"].fmeasure for r in _as_list(references))


def correct_options(target_scores: Sequence[float]) -> list[int]:
    """Indices of the correct options: those with the highest score (BIG-bench ``target_scores``)."""
    if not target_scores:
        raise ValueError("target_scores is empty")
    best = max(target_scores)
    return [i for i, s in enumerate(target_scores) if s == best]


def choice_chance(target_scores: Sequence[float]) -> float:
    """Accuracy of a uniform random pick for one example: #correct options / #options."""
    return len(correct_options(target_scores)) / len(target_scores)


def chance_level(all_target_scores: Sequence[Sequence[float]]) -> float:
    """Mean over examples of :func:`choice_chance` (e.g. 1/4 for four options with one correct)."""
    if not all_target_scores:
        raise ValueError("no examples")
    return sum(choice_chance(s) for s in all_target_scores) / len(all_target_scores)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def macro_average(per_task: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (each task counts once, whatever its number of examples)."""
    values = [v for v in per_task.values() if v is not None and not math.isnan(v)]
    return mean(values)
