"""``gradprune eval``: GradPruner and layer-pruning baselines side by side on real tasks.

For every task, budget (layers removed) and method, one *cell*: load the base model, prune it with
the method (GradPruner through the product's own ``prune_model``: phase-1 capture -> score ->
select -> merge -> surgery), score it on the chosen split, give it the recovery fine-tune that
every model gets (the same LoRA recipe, data order and seed), and score it again. ``dense`` is the
same fine-tune on the unpruned model. Each finished cell is written to ``cells/`` at once, so a
killed sweep continues where it stopped; a cell is redone only if what it depends on changed (its key:
the model, the settings, the rows it trains and is scored on, the method with its defaults filled in).

Besides accuracy (with every item's 1/0, for paired bootstrap intervals), each cell records the
answer loss on the split's right answers before and after recovery, and what the quality guard of
a ``swift sft --gradprune`` run sees on held-out training rows (guard_measures). Rows are in chat
form by default (swift's chatml template), as a swift user's data are.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..architecture import decoder_layers, parameter_counts, text_config
from ..criteria import random_layers
from ..guard import GuardError
from ..measures import mean_kl, mean_loss
from ..surgery import remove_layers
from .finetune import Recipe, lora_finetune
from .methods import PRESETS, Method, parse_method
from .scoring import score_items
from .taskdata import Sizes, TaskCache, TaskData
from .tasks import TASKS

__all__ = ["PRESETS", "Method", "Sizes", "TaskCache", "TaskData", "parse_method", "run_eval"]


def measure(model, cache: TaskCache, splits: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """acc, acc_norm (with each item's 1/0, for paired intervals) and the answer loss of ``model`` on
    ``splits`` (default: every evaluated split)."""
    out = {}
    for split in splits or cache.data.splits:
        items = cache.data.splits[split]
        scores = score_items(model, cache.tokenizer, items, compute_dtype=cache.recipe.compute_dtype)
        out[split] = {"acc": scores.acc, "acc_norm": scores.acc_norm, "loss": mean_loss(model, cache.guards[split]),
                      "items": scores.items, "correct": list(scores.correct),
                      "correct_norm": list(scores.correct_norm)}  # fmt: skip
    return out


def prune_for(method: Method, budget: int, model, cache: TaskCache) -> dict[str, Any]:
    """Prune ``model`` in place with ``method``; return what was removed (and the product's report)."""
    num = len(decoder_layers(model))
    if method.name == "random":
        removed = random_layers(num, budget, int(method.options.get("seed", 0)))
        remove_layers(model, removed)
        return {"removed": removed, "dropped": removed, "merged": {}}
    from ..prune import prune_model

    config = method.config(budget, num)
    steps = method.probe_steps(budget)
    accumulator = cache.probe([steps])[steps] if steps else None
    rows = config.calibration_rows
    calibration = cache.calibration(rows) if config.needs_calibration else None
    guard = cache.guard if method.auto else None
    try:
        result = prune_model(model, accumulator, config, calibration=calibration, guard=guard,
                             criterion_cache=cache.criteria.setdefault(rows, {}))  # fmt: skip
    except GuardError as refusal:  # auto: not even one layer within the threshold; a swift run would stop here
        return {"removed": [], "dropped": [], "merged": {}, "config": config.to_dict(), "refused": str(refusal)}
    plan = result.plan
    healed = heal_for(method, model, plan, cache) if method.heal else {}
    return {
        **healed,
        "removed": list(plan.removed),
        "dropped": list(plan.dropped),
        "merged": {str(k): v for k, v in plan.merged.items()},
        "config": config.to_dict(),
        "criterion": result.report["criterion"],
        "igia_layer_scores": result.report["layer_scores"] if steps else None,
        **({"quality_guard": result.report["quality_guard"]} if "quality_guard" in result.report else {}),
    }


def heal_for(method: Method, model, plan, cache: TaskCache) -> dict[str, Any]:
    """Seam healing of the pruned ``model`` (healing.py) on calibration rows, against a fresh dense copy."""
    from ..healing import dense_rows, heal_seams, seams_of

    settings = dict(method.heal)
    rows = settings.pop("rows")
    seams = seams_of(len(plan.kept) + len(plan.removed), plan.removed)
    dense = dense_rows(cache.load(), cache.calibration(rows), seams)
    return {"healing": heal_seams(model, plan.kept, seams, dense, **settings)}


def guard_measures(model, cache: TaskCache, pruned: bool) -> dict[str, Any]:
    """What a swift run's quality guard can see on the held-out training rows: the answer loss of the
    pruned and the dense model, and the KL of the pruned model's predictions from the dense one's."""
    if cache.dense_guard_loss is None:
        cache.dense_guard_loss = mean_loss(cache.load() if pruned else model, cache.guard)
    loss = mean_loss(model, cache.guard)
    dense = cache.dense_guard_loss
    return {"rows": len(cache.data.guard), "dense_loss": dense, "pruned_loss": loss, "increase": loss / dense - 1,
            "kl": mean_kl(model, cache.guard, cache.dense_guard())}  # fmt: skip


def run_cell(method: Method, budget: int, cache: TaskCache, stage: Callable[[str], None]) -> dict[str, Any]:
    """Prune, score, recover, score again. Scores are per split: {"before": {split: ...}, "after": ...}.

    "before" is scored on the reported split only (a sealed split is for the final table's "after").
    With ``recipe.epochs == 0`` there is no recovery and "after" repeats "before"."""
    timings: dict[str, float] = {}

    def timed(name: str, work):
        stage(name)
        start = time.perf_counter()
        value = work()
        timings[name] = round(time.perf_counter() - start, 1)
        return value

    model = cache.load()
    per_layer, params_before = parameter_counts(model)
    cell: dict[str, Any] = {"num_layers": len(per_layer), "params_before": params_before}
    if method.pruned:
        cell.update(timed("prune", lambda: prune_for(method, budget, model, cache)))
    cell["params_after"] = parameter_counts(model)[1]
    if cache.guard:
        cell["guard"] = timed("guard", lambda: guard_measures(model, cache, method.pruned))
    reported = next(iter(cache.data.splits))
    cell["before"] = timed("score before", lambda: measure(model, cache, [reported]))
    if cache.recipe.epochs > 0:
        curve: list[float] = []
        if method.full:
            from ..healing import full_modules

            cell["full_trained"] = full_modules(model, cell["removed"], cell["num_layers"], method.full)
        model = timed("recovery", lambda: lora_finetune(model, cache.tokenizer, cache.data.examples, cache.recipe,
                                                        progress=lambda _, loss: curve.append(round(loss, 5)),
                                                        chat=cache.data.chat,
                                                        modules_to_save=cell.get("full_trained", ())))  # fmt: skip
        cell["recovery_loss"] = curve
        cell["after"] = timed("score after", lambda: measure(model, cache))
    else:
        cell["after"] = cell["before"]
    cell["seconds"] = timings
    return cell


def cell_key(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def run_eval(
    model_dir: str | Path,
    tasks: Sequence[str],
    budgets: Sequence[int],
    methods: Sequence[Method],
    output: str | Path,
    *,
    split: str = "val",
    sealed: Sequence[str] = (),
    sizes: Sizes | None = None,
    recipe: Recipe | None = None,
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (task, method, budget) cell not already finished under ``output``; return the
    cells of ``split``.

    ``sealed`` splits (e.g. test during a val sweep) are scored by the same cells, after the same
    recovery, and written to ``cells/`` without being returned or reported: a later run with
    ``split="test"`` finds them finished. That way a configuration chosen on val is read on test
    once, without fine-tuning it a second time.
    """
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sizes = sizes or Sizes()
    recipe = recipe or Recipe()
    model_dir = Path(model_dir)
    output = Path(output)
    (output / "cells").mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    splits = list(dict.fromkeys([split, *sealed]))

    def load():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)

    identity = {"model": str(model_dir.resolve()), "model_config": _file_hash(model_dir / "config.json")}
    num_layers = _num_layers(model_dir)
    datas: dict[str, TaskData] = {}

    def settings_of(task: str, name: str, method: Method, budget: int) -> dict[str, Any]:
        if task not in datas:  # the rows are read (not trained on) to key the cells
            datas[task] = TaskData.load(task, splits, sizes)
        return _settings(identity, task, name, method, budget, sizes, recipe, datas[task], num_layers)

    # Method by method (each over every task), so a sweep stopped early has whole rows of the table.
    plan = [(t, m, b) for m in methods for b in (budgets if m.pruned else [0]) for t in tasks]
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    todo = []
    for task, method, budget in plan:
        records = {}
        for name in splits:
            settings = settings_of(task, name, method, budget)
            done = _read(_cell_path(output, task, method, budget, name))
            if done is not None and done.get("key") == cell_key(settings):
                records[name] = done
        if len(records) == len(splits):
            found[(task, method.spec, budget)] = records[split]
        else:
            todo.append((task, method, budget))
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="gradprune eval", unit="cell",
               disable=not show_progress, dynamic_ncols=True)  # fmt: skip
    caches: dict[str, TaskCache] = {}
    for task, method, budget in todo:
        if task not in caches:
            data = datas[task]
            if len(data.train) < sizes.train_rows:
                have = len(data.train)
                print(f"gradprune eval: {task} has {have} training rows after the guard's {sizes.guard_rows} "
                      f"(asked for {sizes.train_rows}); its cells train on {have}", flush=True)  # fmt: skip
            caches[task] = TaskCache(data, load, tokenizer, recipe, sizes)
        cache = caches[task]

        def stage(name: str, task=task, method=method, budget=budget) -> None:
            bar.set_postfix_str(f"{task} {method.spec} n={budget}: {name}")

        start = time.perf_counter()
        cell = run_cell(method, budget, cache, stage)
        shared = {k: v for k, v in cell.items() if k not in ("before", "after")}
        for name in splits:
            settings = settings_of(task, name, method, budget)
            record = {**shared, **settings, "before": cell["before"].get(name), "after": cell["after"][name],
                      "key": cell_key(settings), "trained_rows": len(cache.data.train),
                      "total_seconds": round(time.perf_counter() - start, 1), "versions": _versions(),
                      "device": device, "metric": TASKS[task].metric}  # fmt: skip
            _write(_cell_path(output, task, method, budget, name), record)
            if name == split:
                found[(task, method.spec, budget)] = record
        bar.update(1)
    bar.close()
    return [found[(t, m.spec, b)] for t, m, b in plan]


CELL_VERSION = 2
"""Version of what a cell's key covers. 2: the rows themselves (count and hash of the training, guard and
evaluated rows) and the method's settings with their defaults; cells of version 1 (keyed by the sizes
and the method's spec alone) never match and are recomputed."""


def _settings(identity, task, split, method, budget, sizes, recipe, data: TaskData, num_layers: int) -> dict[str, Any]:
    """What a cell's result depends on; its hash is the cell's key."""
    return {**identity, "task": task, "split": split, "method": method.spec, "budget": budget,
            "sizes": sizes.__dict__, "recipe": recipe.to_dict(), "gradprune_version": __version__,
            "cell_version": CELL_VERSION, "task_rows": data.identity(split),
            "method_settings": method.settings(budget, num_layers)}  # fmt: skip


def _num_layers(model_dir: Path) -> int:
    from transformers import AutoConfig

    return text_config(AutoConfig.from_pretrained(model_dir)).num_hidden_layers


def _cell_path(output: Path, task: str, method: Method, budget: int, split: str) -> Path:
    return output / "cells" / task / f"{_safe(method.spec)}-n{budget}.{split}.json"


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft")} | {"swift-gradpruner": __version__}


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write(path: Path, content: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
