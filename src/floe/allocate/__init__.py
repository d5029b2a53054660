"""FIM-LoRA: per-matrix LoRA ranks from calibration-time LoRA-B gradient statistics.

``allocate_ranks(model, batches, AllocateConfig(budget_rank=8))`` returns an ``Allocation``
whose ``lora_config()`` is a standard ``peft.LoraConfig`` with a ``rank_pattern``;
``save_allocation`` writes it (``adapter_config.json``) with ``allocation.json`` and a rank map.
"""
from .allocator import AllocateConfig, Allocation, allocate_ranks, pattern_keys, save_allocation
from .rounding import BudgetError, allocate, largest_remainder, water_fill

__all__ = [
    "AllocateConfig", "Allocation", "BudgetError", "allocate", "allocate_ranks", "largest_remainder",
    "pattern_keys", "save_allocation", "water_fill",
]
