"""Finding earlier work again (keys.py says what identifies it), and keeping every checkpoint's base.

* A saved phase-1 *state* (``<output_dir>/gradprune/state``: the held-out and calibration rows, the
  IGIA sums and possibly the per-step gradient factors) with the same phase-1 key skips phase 1, if it
  holds what this run reads. Without phase 1 the rows are prepared every run (they are what the rows
  key hashes) and saved as a state of their own, ``gradprune/rows``.
* A *pruned model* whose report has the same prune key is reused as is. Each version folder holds its
  own copy (hard links: no extra disk) of the model its checkpoints name, so deleting an earlier
  ``v*`` folder orphans nothing; a model folder is never overwritten by one made with other settings
  (``gradprune/model``, else ``gradprune/model-<prune key>``), so no checkpoint ends up on other layers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import GradPruneConfig, GradPruneConfigError
from ..importance import state_has_factors
from ..report import read_report
from ..surgery import atomic_dir
from .keys import differences, model_identity, pruning_options, versions

GRADPRUNE_DIR = "gradprune"
MODEL_DIR = "model"
STATE_DIR = "state"
ROWS_DIR = "rows"
"""Without phase 1 the held-out rows are a state of their own, so they never replace a phase-1 state."""
PHASE1_FILE = "phase1.json"


def state_contents(state: Path) -> dict[str, bool]:
    """What a saved state holds: IGIA sums (phase 1 ran) and per-step factors (F can be rebuilt)."""
    info = json.loads((state / PHASE1_FILE).read_text())
    contents = info.get("contents", {"igia": True})  # states of older versions always ran phase 1
    return {"igia": bool(contents["igia"]), "factors": bool(contents["igia"]) and state_has_factors(state)}


def find_state(args, key: str, config: GradPruneConfig) -> Path | None:
    """A complete state with this phase-1 key that holds what ``config`` reads, here or in a sibling
    version folder."""
    for folder in _here_then_siblings(args):
        candidate = folder / STATE_DIR
        info = candidate / PHASE1_FILE
        if not (info.is_file() and json.loads(info.read_text()).get("phase1_key") == key):
            continue
        contents = state_contents(candidate)
        if (contents["igia"] or not config.needs_gradients) and (contents["factors"] or config.merge_layers == 0):
            return candidate
    return None


def _here_then_siblings(args) -> list[Path]:
    """The gradprune folders of this run's output_dir and then of its sibling version folders, newest first."""
    here = Path(args.output_dir)
    folders = [here / GRADPRUNE_DIR]
    if args.add_version:  # earlier runs live in sibling version folders v0-..., v1-...
        siblings = [p for p in here.parent.glob(f"v*/{GRADPRUNE_DIR}") if p != folders[0]]
        folders += sorted(siblings, key=lambda p: p.stat().st_mtime, reverse=True)
    return folders


def model_dirs(gradprune_dir: Path) -> list[Path]:
    """The pruned-model folders in one gradprune folder: ``model`` first, then ``model-<key>``."""
    return sorted(
        (p for p in gradprune_dir.glob(f"{MODEL_DIR}*") if p.is_dir()), key=lambda p: (p.name != MODEL_DIR, p)
    )


def find_pruned_model(args, key: str) -> Path | None:
    """A pruned model saved by an earlier run of the same command (same output_dir, same prune key)."""
    for folder in _here_then_siblings(args):
        for candidate in model_dirs(folder):
            report = read_report(candidate)
            if report and report.get("config_hash") == key and (candidate / "config.json").is_file():
                return candidate
    return None


def new_model_dir(args, key: str) -> Path:
    """Where this run's pruned model goes: ``gradprune/model``, unless an earlier model made with other
    settings is there (checkpoints may name it): then ``gradprune/model-<prune key>``."""
    folder = Path(args.output_dir) / GRADPRUNE_DIR
    plain = folder / MODEL_DIR
    return plain if not plain.exists() else folder / f"{MODEL_DIR}-{key}"


def pruned_model_of_checkpoint(checkpoint: str, identity: dict[str, Any], config: GradPruneConfig,
                               log: Callable[[str], None]) -> tuple[Path, str]:  # fmt: skip
    """The pruned model a phase-2 checkpoint was trained on, and its prune key. It must be intact (its weight
    files as they were saved) and made from this base model (``identity``) with these pruning options;
    nothing of phase 2 counts. Other package versions cannot change a model already on disk: ``log`` says
    which and the run goes on."""
    args_file = Path(checkpoint) / "args.json"
    model = json.loads(args_file.read_text())["model"] if args_file.is_file() else None
    report = read_report(model) if model else None
    if report is None or "model_identity" not in report:
        what = "it names no model" if model is None else (
            f"it was trained on {model}, which is not a GradPruner model made by this version"
            + (" (its report predates the model identity)" if report else ""))  # fmt: skip
        raise GradPruneConfigError(f"--resume_from_checkpoint {checkpoint} cannot be resumed: {what}; start again "
                                   "without --resume_from_checkpoint")  # fmt: skip
    changed = [*_damage(Path(model), report), *differences({"model": identity}, {"model": report["model_identity"]},
                                                           ("model",))]  # fmt: skip
    recorded = report["config"]
    for name, value in pruning_options(config).items():
        if recorded.get(name) != value:
            changed.append((f"gradprune {name}", value, recorded.get(name)))
    if changed:
        raise GradPruneConfigError(
            f"--resume_from_checkpoint {checkpoint} cannot be resumed with these settings: what made its pruned model "
            f"{model} differs: {_listed(changed)}; repeat the original command's model and --gradprune options, or "
            "start again without --resume_from_checkpoint"
        )
    moved = differences({"versions": versions()}, {"versions": report.get("versions") or {}}, ("versions",))
    if moved:
        log(f"[GradPruner] resuming {checkpoint} with other package versions than its pruned model was made with "
            f"({_listed(moved)}): the pruned model on disk is the same, so the run goes on")  # fmt: skip
    return Path(model), report["config_hash"]


def _damage(model: Path, report: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """How the pruned model's files differ from what was saved (``pruned_identity`` in its report)."""
    saved = report.get("pruned_identity")
    if saved is None:  # the run stopped between saving the model and recording its identity
        return [] if (model / "config.json").is_file() else [("pruned model config.json", None, "present")]
    now = model_identity(model) if model.is_dir() else {}
    return [(f"pruned model {name}", now.get(name), saved.get(name)) for name in sorted(set(now) | set(saved))
            if now.get(name) != saved.get(name)]  # fmt: skip


def _listed(changed: list[tuple[str, Any, Any]]) -> str:
    shown = "; ".join(f"{name} {theirs!r} then, {mine!r} now" for name, mine, theirs in changed[:3])
    return shown + (f" ({len(changed) - 3} more)" if len(changed) > 3 else "")


def link_model(source: Path, target: Path) -> str:
    """Give ``target`` its own copy of the pruned model ``source``: hard links where the file system
    allows (no extra disk; deleting the source folder later leaves this one whole), else a copy.
    Atomic: ``target`` appears complete or not at all. Returns how it was done, for the log."""
    copied = 0
    with atomic_dir(target, overwrite=False) as tmp:
        for path in sorted(source.rglob("*")):
            dest = tmp / path.relative_to(source)
            if path.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, dest)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(path, dest)
                copied += path.stat().st_size
    return "hard-linked (no extra disk)" if not copied else f"copied ({copied / 2**30:.2f} GiB)"


def remove_stale_temporaries(output_dir: str | Path) -> list[str]:
    """Delete what a killed run left half-written under ``<output_dir>/gradprune``: ``.model*.tmp``
    (an interrupted save), ``.model*.old-*``, ``.state.building`` and ``.rows.building``. Returns their names."""
    folder = Path(output_dir) / GRADPRUNE_DIR
    stale = [
        *folder.glob(f".{MODEL_DIR}*.tmp"),
        *folder.glob(f".{MODEL_DIR}*.old-*"),
        *folder.glob(f".{STATE_DIR}.building"),
        *folder.glob(f".{ROWS_DIR}.building"),
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in stale)
