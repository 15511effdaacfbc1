"""The methods ``gradprune eval`` compares: GradPruner's configurations and the layer-pruning baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import IGIA_SCORES, GradPruneConfig

PRESETS: dict[str, dict[str, Any]] = {
    "dense": {},
    "gradprune": {},
    "igia": {"score": "squared", "merge_layers": None, "steps": 10},
    "kl": {"score": "kl", "merge_layers": 0},
    "skip_loss": {"score": "skip_loss", "merge_layers": 0},
    "block_influence": {"score": "block_influence", "merge_layers": 0},
    "angular": {"score": "angular", "merge_layers": 0},
    "last": {"score": "last", "merge_layers": 0},
    "random": {"seed": 0},
}
"""Method names and their settings. ``gradprune`` is the product's default configuration,
``igia`` the paper's (Eq. 4, t = 10 phase-1 steps, merging 3 of every 13 removed layers as in its
13/3 Llama setting); the others are the baselines at the same number of removed layers, without
merging. ``name:key=value,...`` changes a setting, e.g. ``igia:steps=32`` or ``kl:calibration_rows=64``;
``prune_layers=auto`` lets the quality guard choose the count, with the cell's budget as its ceiling.
``heal=seam`` (with ``heal_steps``, ``heal_lr``, ``heal_loss``, ``heal_scope``, ``heal_rows``) fits the kept
layer next to each removed run to the dense model's hidden states after pruning (healing.py). ``full=seams``
(or ``full=last``) trains the kept layer at each cut (or the last two layers and the final norm) in full
during the recovery fine-tune, beside LoRA: swift's ``--modules_to_save`` (healing.full_modules)."""

HEAL_DEFAULTS: dict[str, Any] = {"heal_steps": 200, "heal_lr": 3e-4, "heal_loss": "cosine", "heal_scope": "layer",
                                 "heal_rows": 64}  # fmt: skip
"""Seam healing's settings when ``heal=seam`` is given without them."""


@dataclass(frozen=True)
class Method:
    spec: str
    """As written on the command line, e.g. ``igia:steps=32``; the label in tables."""
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def pruned(self) -> bool:
        return self.name != "dense"

    @property
    def heal(self) -> dict[str, Any] | None:
        """Seam-healing settings (healing.heal_seams's keywords and the calibration rows), or None."""
        if "heal" not in self.options:
            return None
        if self.options["heal"] != "seam":
            raise ValueError(f"heal={self.options['heal']!r} in {self.spec!r}: the only healing is heal=seam")
        from ..healing import LOSSES, SCOPES

        settings = {k: self.options.get(k, v) for k, v in HEAL_DEFAULTS.items()}
        checks = {"heal_loss": (lambda v: v in LOSSES, " or ".join(LOSSES)),
                  "heal_scope": (lambda v: v in SCOPES, " or ".join(SCOPES)),
                  "heal_steps": (lambda v: isinstance(v, int) and v > 0, "a positive whole number"),
                  "heal_rows": (lambda v: isinstance(v, int) and v > 0, "a positive whole number"),
                  "heal_lr": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number")}  # fmt: skip
        for key, value in settings.items():
            ok, wanted = checks[key]
            if not ok(value):
                raise ValueError(f"{key}={value!r} in {self.spec!r}: use {wanted}")
        return {k.removeprefix("heal_"): v for k, v in settings.items()}

    @property
    def full(self) -> str | None:
        """Which layers recovery trains in full beside LoRA (healing.FULL), or None."""
        which = self.options.get("full")
        from ..healing import FULL

        if which is not None and (which not in FULL or not self.pruned):
            raise ValueError(f"full={which!r} in {self.spec!r}: use full={' or full='.join(FULL)} on a pruning method")
        return which

    @property
    def auto(self) -> bool:
        return self.options.get("prune_layers") == "auto"

    def config(self, budget: int, num_layers: int = 30) -> GradPruneConfig:
        """The GradPruneConfig of this method at ``budget`` removed layers (not for dense/random); with
        ``prune_layers=auto``, ``budget`` of the ``num_layers`` (equal-sized) layers is the ceiling."""
        options = {k: v for k, v in self.options.items() if k not in ("heal", "full") and k not in HEAL_DEFAULTS}
        if options.get("merge_layers") == "paper":  # the paper's 3-of-13 share (GradPruneConfig's default)
            options["merge_layers"] = None
        if self.auto:
            options["prune_ratio"] = budget / num_layers
        else:
            options["prune_layers"] = budget
        return GradPruneConfig(benchmark=False, **options)

    def settings(self, budget: int, num_layers: int) -> dict[str, Any]:
        """Everything this method does at ``budget`` with defaults filled in (presets, HEAL_DEFAULTS,
        GradPruneConfig's), for the cell key: a changed default changes the key, not only a changed spec."""
        if self.name in ("dense", "random"):
            return {"options": dict(self.options), "full": self.full}
        return {"config": self.config(budget, num_layers).to_dict(), "heal": self.heal, "full": self.full,
                "probe_steps": self.probe_steps(budget)}  # fmt: skip

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
        _ = method.heal  # so are the healing settings
    _ = method.full
    return method


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
