"""Adapters. One folder per method, PEFT-style: ``config.py``, ``layer.py``, ``model.py``; import their
names from the method's package (``floe.adapters.moe_lora``) or from ``floe``."""
