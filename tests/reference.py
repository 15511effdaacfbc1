"""Brute-force reference implementations of the paper's formulas, written for clarity, not speed.

The fast code in swift_gradpruner must agree with these; nothing here is imported by the package.
"""

from __future__ import annotations

import math

import torch


def igia(steps):
    """Eq. 2-3: materialise every simulated gradient G_i = gB_i @ gA_i, square it, average (float64)."""
    total, count = {}, 0
    for grads in steps:
        for name, (grad_a, grad_b) in grads.items():
            g = grad_b.to(torch.float64) @ grad_a.to(torch.float64)
            total[name] = total.get(name, 0) + g * g
        count += 1
    return {name: value / count for name, value in total.items()}


def frobenius_norm_mean(steps):
    """Authors' code variant: mean over steps of ||G_i||_F."""
    total, count = {}, 0
    for grads in steps:
        for name, (grad_a, grad_b) in grads.items():
            g = grad_b.to(torch.float64) @ grad_a.to(torch.float64)
            total[name] = total.get(name, 0.0) + math.sqrt(float((g * g).sum()))
        count += 1
    return {name: value / count for name, value in total.items()}


def top_indices(importance, topp):
    """Flat indices of the ceil(topp * n) largest importances, by a full sort."""
    flat = importance.flatten().tolist()
    keep = math.ceil(topp * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    return {i for i in order[:keep] if flat[i] > 0}


def sign(x):
    x = float(x)
    return (x > 0) - (x < 0)


def merge(retained, sources, topp, mode, retained_importance=None):
    """Eq. 5 / App. B.2, element by element with Python loops."""
    flat_r = retained.flatten().tolist()
    flat_fr = retained_importance.flatten().tolist() if retained_importance is not None else None
    tops = [top_indices(f, topp) for _, f in sources]
    flats = [(w.flatten().tolist(), f.flatten().tolist()) for w, f in sources]
    out = []
    for j, wr in enumerate(flat_r):
        taking = [(wm[j], fm[j]) for (wm, fm), top in zip(flats, tops) if j in top and sign(wm[j]) == sign(wr)]
        if mode == "add":
            out.append(wr + sum(w for w, _ in taking))
        elif mode == "average":
            out.append((wr + sum(w for w, _ in taking)) / (1 + len(taking)))
        elif mode == "fisher":
            num = flat_fr[j] * wr + sum(f * w for w, f in taking)
            den = flat_fr[j] + sum(f for _, f in taking)
            out.append(num / den if den > 0 else wr)
    return torch.tensor(out, dtype=torch.float64).reshape(retained.shape)
