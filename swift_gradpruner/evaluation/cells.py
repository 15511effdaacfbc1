"""What a ``gradprune eval`` cell (one task, method and budget, as results.json holds it) scored."""

from __future__ import annotations

from typing import Any


def primary(cell: dict[str, Any], when: str) -> float:
    """The task's reported metric (acc or acc_norm), in percent, before or after recovery."""
    return 100 * cell[when][cell["metric"]]


def item_results(cell: dict[str, Any], when: str) -> list[int] | None:
    """1/0 per item of the task's metric (None for cells written before items were kept)."""
    scores = cell.get(when) or {}
    return scores.get("correct_norm" if cell["metric"] == "acc_norm" else "correct")
