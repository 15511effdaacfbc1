"""Finding earlier work again (keys.py says what identifies it), and keeping every checkpoint's base.

* A saved *state* (``<output_dir>/gradprune/state``: the held-out and calibration rows, and, when
  phase 1 ran, the IGIA sums and possibly the per-step gradient factors) with the same phase-1 key
  skips phase 1 or the data preparation, if it holds what this run reads.
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
from .keys import NOT_PRUNING, differences

GRADPRUNE_DIR = "gradprune"
MODEL_DIR = "model"
STATE_DIR = "state"
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


def pruned_model_of_checkpoint(checkpoint: str, key: str, material: dict[str, Any], config: GradPruneConfig,
                               log: Callable[[str], None]) -> Path:  # fmt: skip
    """The pruned model a phase-2 checkpoint was trained on; it must come from these same settings, data
    and model. Package versions cannot change a model that is already on disk: when only they differ,
    ``log`` says which and the run goes on."""
    args_file = Path(checkpoint) / "args.json"
    model = json.loads(args_file.read_text())["model"] if args_file.is_file() else None
    report = read_report(model) if model else None
    made = made_with(report) if report else None
    changed = [] if made is None else _changes(material, config, made, report)
    versions_only = all(name.startswith("versions ") for name, _, _ in changed)
    if report is None or (report.get("config_hash") != key and (made is None or not versions_only)):
        what = (f"it was trained on {model}, which is not a GradPruner model made with the same swift and --gradprune "
                "arguments") if not changed else "what made its pruned model differs: " + _listed(changed)  # fmt: skip
        raise GradPruneConfigError(
            f"--resume_from_checkpoint {checkpoint} cannot be resumed with these settings: {what}; repeat the "
            "original command's arguments, or start again without --resume_from_checkpoint"
        )
    if changed:
        log(f"[GradPruner] resuming {checkpoint} with other package versions than its pruned model was made with "
            f"({_listed(changed)}): the pruned model on disk is the same, so the run goes on")  # fmt: skip
    return Path(model)


def made_with(report: dict[str, Any]) -> dict[str, Any] | None:
    """The key material a pruned model's report records, but its GradPruner options (the report's
    ``config``); None for reports of older versions."""
    if "versions" not in report or "config" not in report:
        return None
    return {"swift": report.get("swift_settings"), "model": report.get("model_fingerprint"),
            "versions": report["versions"], "data": report.get("data_digests")}  # fmt: skip


def _changes(material: dict[str, Any], config: GradPruneConfig, made: dict[str, Any], report: dict[str, Any],
             ) -> list[tuple[str, Any, Any]]:  # fmt: skip
    """What differs between this run and the one that made a pruned model: settings, data, model files,
    package versions, GradPruner options."""
    out = differences(material, made, ("swift", "model", "versions", "data"))
    recorded = report["config"]
    for name, value in config.to_dict().items():
        if name not in NOT_PRUNING and recorded.get(name) != value:
            out.append((f"gradprune {name}", value, recorded.get(name)))
    return out


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
    (an interrupted save), ``.model*.old-*`` and ``.state.building``. Returns their names."""
    folder = Path(output_dir) / GRADPRUNE_DIR
    stale = [
        *folder.glob(f".{MODEL_DIR}*.tmp"),
        *folder.glob(f".{MODEL_DIR}*.old-*"),
        *folder.glob(f".{STATE_DIR}.building"),
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return sorted(p.name for p in stale)
