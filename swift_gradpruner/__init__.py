"""swift-gradpruner: GradPruner (arXiv 2601.19503) layer pruning inside ms-swift fine-tuning runs.

Importing this package is cheap (its ``.pth`` start-up hook imports it in every Python process);
the public names below are loaded on first use.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "GradPruneConfig": "config",
    "GradPruneConfigError": "config",
    "IGIAAccumulator": "importance",
    "layer_scores": "importance",
    "save_state": "importance",
    "load_state": "importance",
    "removed_layers": "criteria",
    "skip_loss_order": "criteria",
    "block_influence": "criteria",
    "angular_block": "criteria",
    "GuardReport": "guard",
    "LayerPlan": "selection",
    "plan_layers": "selection",
    "layers_to_remove": "selection",
    "merge_linear": "merge",
    "topp_mask": "merge",
    "remove_layers": "surgery",
    "save_checkpoint": "surgery",
    "UnsupportedModelError": "architecture",
    "prune_model": "prune",
    "prune_checkpoint": "checkpoint",
    "save_pruned": "prune",
    "PruneResult": "prune",
    "gradprune_sft_main": "swift.entry",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
