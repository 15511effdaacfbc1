"""Dense vs pruned measured side by side: alternating rounds after a warm-up, medians, spreads, words.

A busy machine drifts (other jobs, CPU clocks, caches), so one dense run followed by one pruned run
can say anything. Here each round measures both, in ABBA order (dense first in even rounds, pruned
first in odd ones), and the reported ratio is the median of the per-round ratios pruned / dense. A
spread of those ratios wider than ``SPREAD_LIMIT`` of the median marks the result as untrustworthy.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass

SPREAD_LIMIT = 0.25
"""Per-round ratios spanning more than this fraction of their median make a measurement untrusted."""


@dataclass
class Paired:
    """One quantity (e.g. decode seconds) measured for dense and pruned in the same rounds."""

    quantity: str
    unit: str
    dense: list[float]
    pruned: list[float]

    @property
    def ratios(self) -> list[float]:
        return [p / d for d, p in zip(self.dense, self.pruned, strict=True)]

    @property
    def ratio(self) -> float:
        """Median of the per-round ratios pruned / dense (< 1: the pruned model needs less)."""
        return statistics.median(self.ratios)

    @property
    def trusted(self) -> bool:
        ratios = self.ratios
        return len(ratios) >= 3 and (max(ratios) - min(ratios)) <= SPREAD_LIMIT * self.ratio

    def to_dict(self) -> dict:
        ratios = self.ratios
        return {
            "quantity": self.quantity,
            "unit": self.unit,
            "rounds": len(ratios),
            "dense": _stats(self.dense),
            "pruned": _stats(self.pruned),
            "ratio": self.ratio,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "trusted": self.trusted,
            "text": self.text(),
        }

    def text(self) -> str:
        ratio = self.ratio
        words = f"{self.quantity}: pruned {ratio:.0%} of dense ({_faster_or_slower(ratio)})"
        words += f", per-round {min(self.ratios):.0%}-{max(self.ratios):.0%}"
        if not self.trusted:
            words += f"; UNRELIABLE: rounds spread more than {SPREAD_LIMIT:.0%} (a busy machine?), rerun it"
        return words


def alternate(
    dense: Callable[[], float],
    pruned: Callable[[], float],
    quantity: str,
    unit: str,
    *,
    rounds: int,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> Paired:
    """Call each measurement ``warmup`` times unrecorded, then ``rounds`` times each, alternating.

    Each callable runs the workload once and returns its measured value (e.g. seconds).
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    for _ in range(warmup):
        dense()
        pruned()
    result = Paired(quantity, unit, [], [])
    for r in range(rounds):
        order = ((dense, result.dense), (pruned, result.pruned))
        for call, values in order if r % 2 == 0 else reversed(order):
            values.append(call())
        if progress:
            progress(f"{quantity}: round {r + 1}/{rounds}, pruned/dense {result.ratios[-1]:.2f}")
    return result


def _faster_or_slower(ratio: float) -> str:
    if ratio <= 1:
        return f"{1 / ratio:.2f}x faster" if ratio > 0 else "no time"
    return f"{ratio:.2f}x slower"


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}
