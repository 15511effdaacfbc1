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

import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

_BLOCK_ELEMENTS = 1 << 22
"""Elements of one (steps x rows x cols) block while rebuilding F (32 MiB in float64)."""
STEP_CHUNK = 64
"""Steps whose factors are loaded at once while rebuilding F."""

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


def _on_cpu(values: list[torch.Tensor]) -> torch.Tensor:
    """0-dim tensors that may live on different devices (a model split with ``device_map='auto'``) as one
    CPU tensor, in order: stacked per device, one transfer each."""
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        by_device.setdefault(value.device, []).append(i)
    out = torch.empty(len(values), dtype=torch.float64)
    for indices in by_device.values():
        out[indices] = torch.stack([values[i] for i in indices]).to("cpu", torch.float64)
    return out


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

    def __init__(self, keep_factors: bool = True, factor_dir: str | os.PathLike | None = None) -> None:
        """``factor_dir``: write each step's factors there (one safetensors file per step) instead of
        keeping them in RAM, so host memory stays bounded however many steps there are; F is then
        rebuilt by reading one linear's factors from every step file."""
        self.keep_factors = keep_factors
        self.factor_dir = Path(factor_dir) if factor_dir is not None else None
        if self.factor_dir is not None and keep_factors:
            self.factor_dir.mkdir(parents=True, exist_ok=True)
        self._step_files: list[str] = []
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
        sq = _on_cpu([simulated_grad_sq_norm(*grads[n]) for n in names])
        if not bool(torch.isfinite(sq).all()):
            self._skipped += 1
            return False
        for name, value in zip(names, sq.tolist()):
            grad_a, grad_b = grads[name]
            self._shapes.setdefault(name, (grad_b.shape[0], grad_a.shape[1]))
            self._sq_sum[name] = self._sq_sum.get(name, 0.0) + value
            self._norm_sum[name] = self._norm_sum.get(name, 0.0) + math.sqrt(value)
        if self.keep_factors:
            factors = {n: (_cpu_f32(grads[n][0]), _cpu_f32(grads[n][1])) for n in names}
            if self.factor_dir is None:
                self._factors.append(factors)
            else:
                from safetensors.torch import save_file

                name = f"step-{self._used + 1:06d}.safetensors"
                tensors = {f"{n}{suffix}": t for n, pair in factors.items() for suffix, t in zip(_AB, pair)}
                save_file(tensors, str(self.factor_dir / name))
                self._step_files.append(name)
        self._used += 1
        if not bool((sq != 0).any()):
            self._zero += 1
        return True

    def _step_factors(self, name: str, first: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(gA, gB) of linear ``name`` at used steps first..end-1, from memory or from the step files."""
        if self.factor_dir is None:
            return [step[name] for step in self._factors[first:end]]
        from safetensors import safe_open

        out = []
        for file in self._step_files[first:end]:
            with safe_open(str(self.factor_dir / file), framework="pt") as handle:
                out.append(tuple(handle.get_tensor(f"{name}{suffix}") for suffix in _AB))
        return out

    # -- results -------------------------------------------------------------------------------
    @property
    def counts(self) -> StepCounts:
        return StepCounts(used=self._used, skipped_nonfinite=self._skipped, zero=self._zero)

    @property
    def linear_names(self) -> list[str]:
        return list(self._shapes)

    @property
    def factor_bytes(self) -> int:
        """CPU memory held by the stored per-step factors (0 when they are on disk)."""
        return sum(a.numel() * 4 + b.numel() * 4 for step in self._factors for a, b in step.values())

    @property
    def factor_disk_bytes(self) -> int:
        """Disk taken by the per-step factor files (0 when they are in memory)."""
        return sum((self.factor_dir / name).stat().st_size for name in self._step_files) if self.factor_dir else 0

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
        # and the top-p ranking of near-equal elements must not depend on rounding. Steps are taken
        # STEP_CHUNK at a time and rows in blocks (one bmm each), so the working set stays small
        # however many steps there are: F itself plus one chunk of factors.
        out = torch.zeros(rows, cols, dtype=torch.float64, device=device)
        for first in range(0, self._used, STEP_CHUNK):
            chunk = self._step_factors(name, first, first + STEP_CHUNK)
            grad_a, grad_b = (torch.stack(parts).to(device, torch.float64) for parts in zip(*chunk))
            block = max(1, _BLOCK_ELEMENTS // (len(chunk) * cols))
            for start in range(0, rows, block):
                sim = torch.bmm(grad_b[:, start : start + block], grad_a)  # G_i for these rows, chunk's i
                out[start : start + block] += sim.square_().sum(0)
        return out.div_(self._used)


_AB = (".A", ".B")
STATE_FILE = "igia_state.json"


def _state_of(acc: IGIAAccumulator) -> dict:
    return {"format": 1, "factors": acc.keep_factors, "sq_sum": acc._sq_sum, "norm_sum": acc._norm_sum,
            "shapes": {n: list(s) for n, s in acc._shapes.items()}, "used": acc._used,
            "skipped_nonfinite": acc._skipped, "zero": acc._zero, "step_files": acc._step_files}  # fmt: skip


def save_state(accumulator: IGIAAccumulator, directory: str | os.PathLike) -> Path:
    """Write what F and the scores need (sums, step counts, per-step factors as safetensors, a JSON
    index; never pickle) to ``directory``, so pruning can be redone without phase 1 (``load_state``).
    An accumulator built with ``keep_factors=False`` saves its sums only (scores, no F)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not accumulator.keep_factors:  # the sums and counts alone: scores, but no F
        state = _state_of(accumulator)
    elif accumulator.factor_dir is None:  # in memory: write them now, in the same layout
        accumulator._step_files = []
        for i, step in enumerate(accumulator._factors, 1):
            name = f"step-{i:06d}.safetensors"
            tensors = {f"{n}{suffix}": t for n, pair in step.items() for suffix, t in zip(_AB, pair)}
            save_file(tensors, str(directory / name))
            accumulator._step_files.append(name)
        state = _state_of(accumulator)
        accumulator._step_files = []
    else:
        if accumulator.factor_dir.resolve() != directory.resolve():
            for name in accumulator._step_files:
                shutil.copy2(accumulator.factor_dir / name, directory / name)
        state = _state_of(accumulator)
    (directory / STATE_FILE).write_text(json.dumps(state) + "\n", encoding="utf-8")
    return directory


def load_state(directory: str | os.PathLike) -> IGIAAccumulator:
    """The accumulator ``save_state`` wrote; its factors stay on disk and are read when F is rebuilt."""
    directory = Path(directory)
    path = directory / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no IGIA state ({STATE_FILE} is missing)")
    state = json.loads(path.read_text(encoding="utf-8"))
    missing = [n for n in state["step_files"] if not (directory / n).is_file()]
    if state.get("format") != 1 or missing:
        raise ValueError(f"{directory} holds an incomplete IGIA state (missing {missing[:3]})")
    factors = state.get("factors", True)
    acc = IGIAAccumulator(keep_factors=factors, factor_dir=directory if factors else None)
    acc._sq_sum, acc._norm_sum = dict(state["sq_sum"]), dict(state["norm_sum"])
    acc._shapes = {n: (int(s[0]), int(s[1])) for n, s in state["shapes"].items()}
    acc._used, acc._skipped, acc._zero = state["used"], state["skipped_nonfinite"], state["zero"]
    acc._step_files = list(state["step_files"])
    return acc


def state_has_factors(directory: str | os.PathLike) -> bool:
    """Whether a saved state holds the per-step factors (F can be rebuilt from it, for a merge)."""
    path = Path(directory) / STATE_FILE
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("factors", True)


def drop_factors(directory: str | os.PathLike) -> int:
    """Delete a saved state's per-step factor files, keeping its sums (scores stay, F cannot be rebuilt);
    returns the bytes freed. The index is rewritten first, so an interruption leaves a valid state."""
    directory = Path(directory)
    path = directory / STATE_FILE
    state = json.loads(path.read_text(encoding="utf-8"))
    files = [directory / name for name in state["step_files"]]
    state.update(factors=False, step_files=[])
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    freed = 0
    for file in files:
        if file.is_file():
            freed += file.stat().st_size
            file.unlink()
    return freed


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
