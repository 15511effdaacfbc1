"""``gradprune eval``: GradPruner and layer-pruning baselines side by side on real tasks.

For every task, budget (layers removed) and method, one *cell*: load the base model, prune it with
the method (GradPruner through the product's own ``prune_model``: phase-1 capture -> score ->
select -> merge -> surgery), score it on the chosen split, give it the recovery fine-tune that
every model gets (the same LoRA recipe, data order and seed), and score it again. ``dense`` is the
same fine-tune on the unpruned model. Each finished cell is written to ``cells/`` at once, so a
killed sweep continues where it stopped; a cell is redone only if its settings changed.

Besides accuracy, each cell records the answer loss on the split's right answers, before and after
recovery: the signal the quality guard of a ``swift sft --gradprune`` run watches.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..architecture import parameter_counts
from ..config import IGIA_SCORES, GradPruneConfig
from ..criteria import mean_loss, random_layers
from ..importance import IGIAAccumulator
from ..surgery import remove_layers
from .finetune import Recipe, batches, collate, encode_examples, lora_finetune
from .scoring import score_items
from .tasks import TASKS, Item, load_task

PRESETS: dict[str, dict[str, Any]] = {
    "dense": {},
    "gradprune": {},
    "igia": {"score": "squared", "merge_layers": None, "steps": 10},
    "skip_loss": {"score": "skip_loss", "merge_layers": 0},
    "block_influence": {"score": "block_influence", "merge_layers": 0},
    "angular": {"score": "angular", "merge_layers": 0},
    "last": {"score": "last", "merge_layers": 0},
    "random": {"seed": 0},
}
"""Method names and their settings. ``gradprune`` is the product's default configuration,
``igia`` the paper's (Eq. 4, t = 10 phase-1 steps, merging 3 of every 13 removed layers as in its
13/3 Llama setting); the others are the baselines at the same number of removed layers, without
merging. ``name:key=value,...`` changes a setting, e.g. ``igia:steps=32`` or ``igia:merge_layers=0``."""


@dataclass(frozen=True)
class Method:
    spec: str
    """As written on the command line, e.g. ``igia:steps=32``; the label in tables."""
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        return self.name != "dense"

    def config(self, budget: int) -> GradPruneConfig:
        """The GradPruneConfig of this method at ``budget`` removed layers (not for dense/random)."""
        options = {k: v for k, v in self.options.items() if k != "protect"}
        if options.get("merge_layers") == "paper":  # the paper's 3-of-13 share (GradPruneConfig's default)
            options["merge_layers"] = None
        return GradPruneConfig(prune_layers=budget, benchmark=False, **options)

    def probe_steps(self, budget: int) -> int | None:
        """Phase-1 steps whose gradients this method needs (None: it needs none)."""
        if self.name in ("dense", "random"):
            return None
        config = self.config(budget)
        if config.score in IGIA_SCORES or config.merge_count(budget) > 0:
            return config.steps or 10
        return None


def parse_method(spec: str) -> Method:
    """``name`` or ``name:key=value,key=value`` (see PRESETS)."""
    name, _, rest = spec.partition(":")
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(PRESETS)} (options as name:key=value)")
    options = dict(PRESETS[name])
    for pair in filter(None, rest.split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"method option {pair!r} in {spec!r} must be key=value")
        options[key.strip()] = _value(value.strip())
    method = Method(spec=spec, name=name, options=options)
    if name not in ("dense", "random"):
        method.config(12)  # validates the options now, not hours into a sweep
    return method


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


@dataclass(frozen=True)
class Sizes:
    train_rows: int = 256
    """Training rows per task (recovery fine-tune, phase-1 probe, calibration)."""
    eval_items: int = 100
    """Items of the val split per task."""
    test_items: int = 200
    """Items of the test split per task (more: it is read once, for the final table)."""
    calibration_rows: int = 16
    guard_rows: int = 32
    """Training rows held out of every fine-tune, for the quality guard's loss (as in a swift run)."""


@dataclass
class TaskData:
    name: str
    train: list[Item]
    splits: dict[str, list[Item]]
    """Evaluated items per split (the reported one, and any sealed one)."""
    guard: list[Item]
    """Training rows no fine-tune sees, for the quality guard."""

    @classmethod
    def load(cls, task: str, splits: Sequence[str], sizes: Sizes) -> TaskData:
        rows = load_task(task, "train", sizes.train_rows + sizes.guard_rows)
        train = min(sizes.train_rows, len(rows) - sizes.guard_rows)
        evaluated = {name: load_task(task, name, sizes.test_items if name == "test" else sizes.eval_items)
                     for name in splits}  # fmt: skip
        return cls(task, rows[:train], evaluated, rows[train : train + sizes.guard_rows])

    @property
    def examples(self) -> list[tuple[str, str]]:
        return [item.answer for item in self.train]


class TaskCache:
    """What several cells of one task share: the phase-1 probe's accumulators and calibration batches."""

    def __init__(self, data: TaskData, load: Callable[[], torch.nn.Module], tokenizer, recipe: Recipe, sizes: Sizes):
        self.data, self.load, self.tokenizer, self.recipe, self.sizes = data, load, tokenizer, recipe, sizes
        self.probes: dict[int, IGIAAccumulator] = {}
        self.criteria: dict = {}
        """Removal-criterion measurements on the unpruned model, shared by the budgets."""
        self.guards = {split: guard_batches(tokenizer, items, recipe) for split, items in data.splits.items()}
        self.guard = guard_batches(tokenizer, data.guard, recipe)
        self.dense_guard_loss: float | None = None

    def calibration(self) -> list[dict[str, torch.Tensor]]:
        """Batches of the first ``calibration_rows`` training rows in the fine-tune's shuffled order."""
        size = self.recipe.batch_size
        count = math.ceil(self.sizes.calibration_rows / size)
        return batches(self.tokenizer, self.data.examples, size, self.recipe.max_length, count, self.recipe.seed)

    def probe(self, steps: Sequence[int]) -> dict[int, IGIAAccumulator]:
        """Accumulators of GradPruner's phase 1 for each step count: the LoRA fine-tune of the dense
        model (the recovery recipe at its full learning rate after warm-up, as at the start of a long
        run) with the product's gradient capture after every backward pass."""
        from ..capture import lora_pairs, read_lora_grads

        missing = sorted(set(steps) - set(self.probes))
        if missing:
            fresh = {t: IGIAAccumulator() for t in missing}
            done = [0]

            def capture(peft_model) -> None:
                grads = read_lora_grads(lora_pairs(peft_model))
                done[0] += 1
                for t, accumulator in fresh.items():
                    if done[0] <= t:
                        accumulator.update(grads)

            lora_finetune(
                self.load(), self.tokenizer, self.data.examples, self.recipe,
                steps=max(missing), constant_after_warmup=True, on_backward=capture,
            )  # fmt: skip
            self.probes.update(fresh)
        return {t: self.probes[t] for t in steps}


def guard_batches(tokenizer, items: Sequence[Item], recipe: Recipe) -> list[dict[str, torch.Tensor]]:
    """The evaluated items' right answers as loss batches (answer tokens only)."""
    encoded = encode_examples(tokenizer, [item.answer for item in items], recipe.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    size = recipe.batch_size
    return [collate(encoded[i : i + size], pad) for i in range(0, len(encoded), size)]


def measure(model, cache: TaskCache, splits: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """acc, acc_norm and the answer loss of ``model`` on ``splits`` (default: every evaluated split)."""
    out = {}
    for split in splits or cache.data.splits:
        items = cache.data.splits[split]
        scores = score_items(model, cache.tokenizer, items)
        out[split] = {"acc": scores.acc, "acc_norm": scores.acc_norm, "loss": mean_loss(model, cache.guards[split]),
                      "items": scores.items}  # fmt: skip
    return out


def prune_for(method: Method, budget: int, model, cache: TaskCache) -> dict[str, Any]:
    """Prune ``model`` in place with ``method``; return what was removed (and the product's report)."""
    if method.name == "random":
        num = len(model.model.layers)
        removed = random_layers(num, budget, int(method.options.get("seed", 0)))
        remove_layers(model, removed)
        return {"removed": removed, "dropped": removed, "merged": {}}
    from ..prune import prune_model

    config = method.config(budget)
    steps = method.probe_steps(budget)
    accumulator = cache.probe([steps])[steps] if steps else None
    calibration = cache.calibration() if config.needs_calibration else None
    result = prune_model(model, accumulator, config, calibration=calibration, criterion_cache=cache.criteria)
    plan = result.plan
    return {
        "removed": list(plan.removed),
        "dropped": list(plan.dropped),
        "merged": {str(k): v for k, v in plan.merged.items()},
        "config": config.to_dict(),
        "criterion": result.report["criterion"],
        "igia_layer_scores": result.report["layer_scores"] if steps else None,
    }


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
    if cache.guard:  # the quality guard of a swift run: loss on held-out training rows, pruned vs dense
        if cache.dense_guard_loss is None:
            cache.dense_guard_loss = mean_loss(cache.load() if method.pruned else model, cache.guard)
        loss = mean_loss(model, cache.guard)
        dense = cache.dense_guard_loss
        cell["guard"] = {
            "rows": len(cache.data.guard),
            "dense_loss": dense,
            "pruned_loss": loss,
            "increase": loss / dense - 1,
        }
    reported = next(iter(cache.data.splits))
    cell["before"] = timed("score before", lambda: measure(model, cache, [reported]))
    if cache.recipe.epochs > 0:
        model = timed("recovery", lambda: lora_finetune(model, cache.tokenizer, cache.data.examples, cache.recipe))
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
    # Method by method (each over every task), so a sweep stopped early has whole rows of the table.
    plan = [(t, m, b) for m in methods for b in (budgets if m.pruned else [0]) for t in tasks]
    found: dict[tuple[str, str, int], dict[str, Any]] = {}
    todo = []
    for task, method, budget in plan:
        records = {}
        for name in splits:
            settings = _settings(identity, task, name, method, budget, sizes, recipe)
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
            caches[task] = TaskCache(TaskData.load(task, splits, sizes), load, tokenizer, recipe, sizes)
        cache = caches[task]

        def stage(name: str, task=task, method=method, budget=budget) -> None:
            bar.set_postfix_str(f"{task} {method.spec} n={budget}: {name}")

        start = time.perf_counter()
        cell = run_cell(method, budget, cache, stage)
        shared = {k: v for k, v in cell.items() if k not in ("before", "after")}
        for name in splits:
            settings = _settings(identity, task, name, method, budget, sizes, recipe)
            record = {**shared, **settings, "before": cell["before"].get(name), "after": cell["after"][name],
                      "key": cell_key(settings), "total_seconds": round(time.perf_counter() - start, 1),
                      "versions": _versions(), "device": device, "metric": TASKS[task].metric}  # fmt: skip
            _write(_cell_path(output, task, method, budget, name), record)
            if name == split:
                found[(task, method.spec, budget)] = record
        bar.update(1)
    bar.close()
    return [found[(t, m.spec, b)] for t, m, b in plan]


def _settings(identity, task, split, method, budget, sizes, recipe) -> dict[str, Any]:
    return {**identity, "task": task, "split": split, "method": method.spec, "budget": budget,
            "sizes": sizes.__dict__, "recipe": recipe.to_dict(), "gradprune_version": __version__}  # fmt: skip


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
