"""IGIA importance (paper Sec. 3.1, Eq. 2-4) from per-step LoRA gradients, without materialising dB.dA.

For a frozen linear W (m x n) with LoRA factors A (r x n) and B (m x r), step i gives gradients
gA_i and gB_i. The simulated full gradient is G_i = gB_i @ gA_i (Eq. 2; the paper prints dB.dB, a
typo), the IGIA matrix is F = mean_i G_i * G_i (Eq. 3) and a layer's score is the sum of F over its
linears (Eq. 4). Scores only need sum(F) = mean_i ||G_i||_F^2, and

    ||gB gA||_F^2 = trace(gA^T gB^T gB gA) = sum((gB^T gB) * (gA gA^T)),

two r x r Gram matrices: O(r^2 (m + n)) per linear and step instead of O(r m n), and one float of
state per linear. The elementwise F is needed only for the few merged layers, which are known only
after scoring, so the per-step factors are kept on CPU (t * r * sum(m + n) floats) and F is rebuilt
exactly for the linears that ask for it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_BLOCK_ELEMENTS = 1 << 22
"""Elements of one (steps x rows x cols) block while rebuilding F (32 MiB in float64)."""

LoraGrads = Mapping[str, tuple[torch.Tensor, torch.Tensor]]
"""Linear name -> (gradient of A, r x n; gradient of B, m x r) for one optimizer step."""


@dataclass(frozen=True)
class StepCounts:
    """How the captured optimizer steps were used."""

    used: int
    """Steps averaged into the scores (t in Eq. 3), zero ones included."""
    skipped_nonfinite: int
    """Steps dropped because a gradient held NaN or inf."""
    zero: int
    """Used steps whose simulated gradient was zero for every linear (LoRA B = 0 at init)."""


def simulated_grad_sq_norm(grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """||gB @ gA||_F^2 through the Gram identity, in float64 (a 0-dim tensor on the input's device)."""
    a = grad_a.detach().to(torch.float64)
    b = grad_b.detach().to(torch.float64)
    return ((b.T @ b) * (a @ a.T)).sum()


class IGIAAccumulator:
    """Accumulates IGIA scores one optimizer step at a time and rebuilds F on request.

    Feed ``update`` the LoRA gradients of every targeted linear once per optimizer step (after
    gradient accumulation). Steps with a NaN/inf gradient are skipped and counted; steps whose
    simulated gradient is all zero still count towards t, as in the paper, and are reported.
    """

    def __init__(self, keep_factors: bool = True) -> None:
        self.keep_factors = keep_factors
        self._sq_sum: dict[str, float] = {}
        self._norm_sum: dict[str, float] = {}
        self._shapes: dict[str, tuple[int, int]] = {}
        self._factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self._used = 0
        self._skipped = 0
        self._zero = 0

    # -- feeding -------------------------------------------------------------------------------
    def update(self, grads: LoraGrads) -> bool:
        """Add one optimizer step; return False if it was skipped for non-finite gradients."""
        if not grads:
            raise ValueError("IGIAAccumulator.update got no LoRA gradients: no linear was targeted")
        names = list(grads)
        if self._shapes and set(names) != set(self._shapes):
            missing = sorted(set(self._shapes) ^ set(names))[:3]
            raise ValueError(f"LoRA gradients changed between steps (e.g. {missing}); feed the same linears")
        sq = torch.stack([simulated_grad_sq_norm(*grads[n]) for n in names]).cpu()
        if not bool(torch.isfinite(sq).all()):
            self._skipped += 1
            return False
        for name, value in zip(names, sq.tolist()):
            grad_a, grad_b = grads[name]
            self._shapes.setdefault(name, (grad_b.shape[0], grad_a.shape[1]))
            self._sq_sum[name] = self._sq_sum.get(name, 0.0) + value
            self._norm_sum[name] = self._norm_sum.get(name, 0.0) + math.sqrt(value)
        if self.keep_factors:
            self._factors.append({n: (_cpu_f32(grads[n][0]), _cpu_f32(grads[n][1])) for n in names})
        self._used += 1
        if not bool((sq != 0).any()):
            self._zero += 1
        return True

    # -- results -------------------------------------------------------------------------------
    @property
    def counts(self) -> StepCounts:
        return StepCounts(used=self._used, skipped_nonfinite=self._skipped, zero=self._zero)

    @property
    def linear_names(self) -> list[str]:
        return list(self._shapes)

    @property
    def factor_bytes(self) -> int:
        """CPU memory held by the stored per-step factors."""
        return sum(a.numel() * 4 + b.numel() * 4 for step in self._factors for a, b in step.values())

    def linear_scores(self, kind: str = "squared") -> dict[str, float]:
        """Per-linear score: sum of F (Eq. 3-4, 'squared') or the mean of ||G_i||_F ('norm')."""
        if self._used == 0:
            raise ValueError(f"no usable gradient step was captured ({self._skipped} skipped for NaN/inf gradients)")
        source = {"squared": self._sq_sum, "norm": self._norm_sum}[kind]
        return {name: value / self._used for name, value in source.items()}

    def igia(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The exact IGIA matrix F = mean_i (gB_i @ gA_i)^2 of one linear (Eq. 3), float64, m x n."""
        if not self.keep_factors:
            raise ValueError("this accumulator was built with keep_factors=False; F cannot be rebuilt")
        if name not in self._shapes:
            raise KeyError(f"no LoRA gradients were captured for linear {name!r}")
        rows, cols = self._shapes[name]
        # float64 throughout: squares of gradients near 1e-20 are common and must not underflow,
        # and the top-p ranking of near-equal elements must not depend on rounding. Rows are done
        # in blocks of all steps at once (one bmm each), so the working set stays small.
        grad_a = torch.stack([step[name][0] for step in self._factors]).to(device, torch.float64)
        grad_b = torch.stack([step[name][1] for step in self._factors]).to(device, torch.float64)
        out = torch.empty(rows, cols, dtype=torch.float64, device=device)
        block = max(1, _BLOCK_ELEMENTS // (self._used * cols))
        for start in range(0, rows, block):
            sim = torch.bmm(grad_b[:, start : start + block], grad_a)  # G_i for these rows, all i
            out[start : start + block] = sim.square_().sum(0)
        return out.div_(self._used)


def layer_scores(
    linear_scores: Mapping[str, float], num_layers: int, layers_prefix: str = "model.layers."
) -> tuple[list[float], list[str]]:
    """Eq. 4: sum the per-linear scores of each decoder layer.

    Returns the list of ``num_layers`` scores and the names that belong to no decoder layer
    (e.g. a targeted lm_head), which do not count.
    """
    pattern = re.compile(re.escape(layers_prefix) + r"(\d+)\.")
    scores = [0.0] * num_layers
    outside: list[str] = []
    for name, value in linear_scores.items():
        match = pattern.match(name)
        if match is None or int(match.group(1)) >= num_layers:
            outside.append(name)
            continue
        scores[int(match.group(1))] += value
    return scores, outside


def _cpu_f32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32, copy=True)
