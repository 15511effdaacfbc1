"""Remove decoder layers from a Hugging Face causal LM, in memory and as a plain checkpoint on disk.

Deleting entries of the decoder's layer list is not enough: the config must say how many layers are
left (``num_hidden_layers``), per-layer config entries must follow the same selection
(layer_config.py), and every module's ``layer_idx`` (attention, linear attention) must be renumbered
0..L'-1 because the KV cache and the linear-attention state are indexed by it. ``save_pretrained``
then writes safetensors whose keys are numbered by position, so transformers, vLLM and ``swift infer``
load the result as an ordinary model of the same architecture.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from .architecture import decoder, decoder_layers, text_config
from .layer_config import check_removal, layer_keys, prune_config


def remove_layers(model: nn.Module, removed: Sequence[int]) -> None:
    """Delete decoder layers in place and make config and ``layer_idx`` agree with what is left."""
    layers = decoder_layers(model)
    gone = set(removed)
    kept = [j for j in range(len(layers)) if j not in gone]
    if not kept:
        raise ValueError("cannot remove every decoder layer")
    check_removal(model.config, kept)
    prune_config(model.config, kept)
    _install(model, [layers[j] for j in kept], {})


@contextmanager
def layers_view(model: nn.Module, kept: Sequence[int]) -> Iterator[nn.Module]:
    """Run ``model`` as if only the decoder layers ``kept`` existed, without changing its weights.

    For removal-damage measurements: the layer list and the per-layer config entries are swapped
    for the view and restored afterwards (``layer_idx`` is left alone, so use no KV cache inside).
    """
    stack = decoder(model)
    layers = stack.layers
    config = text_config(model.config)
    saved = _layer_config(config)
    sliding = getattr(stack, "has_sliding_layers", None)
    prune_config(config, list(kept))
    stack.layers = nn.ModuleList(layers[j] for j in kept)
    if sliding is not None:
        stack.has_sliding_layers = "sliding_attention" in config.layer_types
    try:
        yield model
    finally:
        stack.layers = layers
        for key, value in saved.items():
            setattr(config, key, value)
        if sliding is not None:
            stack.has_sliding_layers = sliding


class Snapshot:
    """The model's decoder layers, their config entries and some layers' weights as they are now, so
    that the model can be run that way again after surgery (the per-run dense-vs-pruned timing).

    Layers are held by reference: removed layers stay in memory as long as the snapshot lives, and
    only the weights of ``weights_of`` (the merge targets, which the merge changes in place) are copied.
    """

    def __init__(self, model: nn.Module, weights_of: Sequence[int] = ()) -> None:
        self.model = model
        self.layers = list(decoder_layers(model))
        self.config = _layer_config(model.config)
        self.weights = {p: p.detach().clone() for j in weights_of for p in self.layers[j].parameters()}

    @contextmanager
    def restored(self) -> Iterator[nn.Module]:
        """Run the model as it was when the snapshot was taken; back to its current state on exit."""
        now_layers, now_config = list(decoder_layers(self.model)), _layer_config(self.model.config)
        _install(self.model, self.layers, self.config)
        self._swap_weights()
        try:
            yield self.model
        finally:
            self._swap_weights()
            _install(self.model, now_layers, now_config)

    def _swap_weights(self) -> None:
        for param, other in self.weights.items():
            self.weights[param], param.data = param.data, other


def _layer_config(config) -> dict:
    """The per-layer entries of the decoder's config (copies, so later rewrites do not reach them)."""
    config = text_config(config)
    return {k: copy.deepcopy(getattr(config, k)) for k in layer_keys(config)}


def _install(model: nn.Module, layers: list[nn.Module], values: dict) -> None:
    """Make ``layers`` the model's decoder layers, numbered 0..n-1 for the KV cache, with their config."""
    config = text_config(model.config)
    for key, value in values.items():
        setattr(config, key, value)
    stack = decoder(model)
    stack.layers = nn.ModuleList(layers)
    for index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = index
    if hasattr(stack, "has_sliding_layers"):
        stack.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or [])


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty output directory unless ``overwrite`` (call before expensive work)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(
            f"output directory {str(path)!r} exists and is not empty; choose another or allow overwrite"
        )
    return path


def save_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: Mapping[str, Callable[[Path], None]] | None = None,
    after_save: Sequence[Callable[[Path], None]] = (),
) -> Path:
    """Write a plain HF checkpoint atomically (``atomic_dir``), in this order: ``save_pretrained`` (config,
    weights, index), the tokenizer, ``extra_files`` (a file name -> a writer called with its path, e.g. the
    report; each writes its own file only, so their order does not matter), then ``after_save``: steps
    called in list order with the folder once all of that is there, for work that changes what was
    written (e.g. appending shards and rewriting the index, ``streaming.append_mtp``).
    """
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, write in (extra_files or {}).items():
            write(tmp / name)
        for step in after_save:
            step(tmp)
    return Path(out_dir)


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to fill, renamed to ``out_dir`` when the block succeeds.

    If anything fails, nothing is left at ``out_dir`` (an old directory there is kept as it was).
    """
    out_dir = check_output_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700: a server running as another user could not read it
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            try:
                tmp.rename(out_dir)
            except BaseException:
                old.rename(out_dir)  # put the previous checkpoint back where it was
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
