"""A selection's files: ``selection.json``, ``masks.safetensors``, ``layer_importance.png`` and, with
stability on, ``stability.png`` (written by ``floe select`` and by ``floe run``'s select stage)."""
from __future__ import annotations

from pathlib import Path

from floe.selection.api import Selection

OUTPUT_FILES = ("selection.json", "masks.safetensors", "layer_importance.png", "stability.png")


def write_outputs(sel: Selection, out: Path, title: str = "") -> list[Path]:
    """Write every output into a temp folder first, then move them all into ``out`` (its other
    files stay: :func:`floe.io.atomic_dir` with ``existing="merge"``)."""
    from floe.io import atomic_dir
    from floe.selection.plots import plot_layer_heatmap
    from floe.selection.stability import StabilityResult, plot_stability

    names: list[str] = []

    def write(tmp: Path) -> None:
        sel.to_json(tmp / "selection.json")
        sel.save_masks(tmp / "masks.safetensors")
        plot_layer_heatmap(sel.head_importance, sel.neuron_importance, sel.scores, sel.chosen,
                           tmp / "layer_importance.png", title=title)
        if sel.stability:
            plot_stability(StabilityResult(**sel.stability), tmp / "stability.png", title=title)
        names.extend(name for name in OUTPUT_FILES if (tmp / name).exists())

    atomic_dir(out, write, existing="merge")
    return [out / name for name in names]
