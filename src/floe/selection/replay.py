"""Replaying the decoder layers one at a time, for the tuning stage (:mod:`.tuning`).

One truncated forward per batch records the first layer's input and the extra arguments the
model passes each layer (position embeddings, attention mask, ...); :func:`run_layer` then runs
any layer on any hidden state with them. :class:`Capture` hooks record a layer's projection
inputs (before the masks) and outputs, and can stop a layer right after its ``o_proj``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from floe.arch import model_inputs
from floe.distributed import shard
from floe.selection.importance import BatchCounter, SelectionError, check_batch_count
from floe.selection.masks import token_mask


class Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class BatchState:
    x_teacher: torch.Tensor
    x_student: torch.Tensor
    tokens: torch.Tensor  # (batch, seq) bool
    calls: list[tuple[tuple, dict]]  # per layer: the extra args/kwargs the model passed it


class Capture:
    """Forward hooks recording a layer's projection inputs (pre-mask) and outputs."""

    def __init__(self, o_proj: nn.Module, o_base: nn.Linear, down: nn.Module, down_base: nn.Linear):
        self.values: dict[str, torch.Tensor] = {}
        self.stop_after_o = False  # end the layer's forward once o_proj has run (attention pass)
        self.handles = [
            o_base.register_forward_pre_hook(self._pre("z_attn"), prepend=True),
            down_base.register_forward_pre_hook(self._pre("z_ffn"), prepend=True),
            o_proj.register_forward_hook(self._post("o")),
            down.register_forward_hook(self._post("d")),
        ]

    def _pre(self, key: str):
        def hook(module, args):
            self.values[key] = args[0].detach()
        return hook

    def _post(self, key: str):
        def hook(module, args, output):
            self.values[key] = (output[0] if isinstance(output, tuple) else output).detach()
            if key == "o" and self.stop_after_o:
                raise Stop
        return hook

    def run_attention(self, layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> None:
        """Run ``layer`` up to its ``o_proj`` only (the FFN is not needed for the attention pass)."""
        self.stop_after_o = True
        try:
            run_layer(layer, hidden, call)
        except Stop:
            pass
        finally:
            self.stop_after_o = False

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict],
                          device: torch.device) -> list[BatchState]:
    """One truncated forward per batch: the first layer's hidden input and every layer's call args."""
    states: list[BatchState] = []
    seen = BatchCounter()
    for _, batch in shard(seen.wrap(batches)):
        calls: list[tuple[tuple, dict]] = []
        first: list[torch.Tensor] = []

        def pre(module, args, kwargs, _calls=calls, _first=first):
            hidden = args[0] if args else kwargs["hidden_states"]
            if not _first:
                _first.append(hidden.detach())
            rest = args[1:] if args else ()
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            _calls.append((rest, kw))
            if len(_calls) == len(layers):
                raise Stop

        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad():
                model(**{k: v for k, v in model_inputs(batch, device).items() if k != "labels"},
                      use_cache=False)
        except Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if len(calls) != len(layers):
            raise SelectionError(f"tuning stage: the model called {len(calls)} of its {len(layers)} "
                                 "decoder layers; cannot replay them one by one")
        tok = token_mask(batch).to(device)
        states.append(BatchState(first[0], first[0].clone(), tok, calls))
    n_seen = seen.count
    check_batch_count(n_seen)
    return states


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return _first_tensor(layer(hidden, *args, **kwargs))
