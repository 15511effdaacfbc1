"""Where the prune step runs the model: rank 0's GPU, the node's GPUs through a device_map, or the CPU.

A bf16 model above ~35B does not fit one 80 GB card; the criterion and the guard then ran on the CPU
for hours while the other GPUs idled. ``plan_devices`` chooses from numbers alone (free memory per
GPU, checkpoint size), so the choice is tested without a GPU; ``checkpoint.py`` probes the GPUs and
loads the model as the plan says (transformers' ``from_pretrained(device_map=..., max_memory=...)``,
which leaves the placement of the layers to accelerate). The criteria, the guard and the surgery take
a model whose layers sit on several GPUs (accelerate's hooks move the hidden states between them).
After running out of GPU memory, ``plan_after_oom`` says what to try next: one GPU -> several -> the CPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

RESERVE_BYTES = 4 << 30
"""GPU memory each GPU keeps free for what the prune step computes (activations, logit chunks, the
guard's dense targets: a few GiB at 32 x 500 guard tokens of a 70B model) and the CUDA context."""
RESERVE_FRACTION = 0.05
"""And this share of each GPU's free memory (allocator fragmentation)."""


@dataclass(frozen=True)
class DevicePlan:
    """The devices of the prune step: no GPU (CPU), one GPU, or a device_map over several."""

    gpus: tuple[int, ...] = ()
    max_memory: dict[int, int] = field(default_factory=dict)
    """Bytes of weights each GPU may hold (several GPUs only)."""
    reason: str = ""
    """Why the CPU (when there are GPUs)."""

    @property
    def device(self) -> str:
        """Where inputs go and IGIA matrices are rebuilt: the first GPU, or the CPU."""
        return f"cuda:{self.gpus[0]}" if self.gpus else "cpu"

    @property
    def device_map(self) -> str | dict[str, str]:
        """``from_pretrained``'s device_map: the whole model on one device, or accelerate's balanced map."""
        return "auto" if len(self.gpus) > 1 else {"": self.device}

    def describe(self) -> str:
        """E.g. 'cuda:0-7 (device_map over 8 GPUs)'."""
        if not self.gpus:
            return "the CPU" + (f" ({self.reason})" if self.reason else "")
        if len(self.gpus) == 1:
            return f"{self.device} (one GPU)"
        return f"{_gpu_range(self.gpus)} (device_map over {len(self.gpus)} GPUs)"


CPU = DevicePlan()


def plan_devices(free: Mapping[int, int], model_bytes: int, num_layers: int) -> DevicePlan:
    """The prune step's devices for a checkpoint of ``model_bytes`` bytes of weights in ``num_layers``
    decoder layers, given the free bytes of each GPU (``free``, rank 0's own first).

    One GPU when the model fits on the first with room to spare (RESERVE_*); else every GPU with room,
    when together they hold it (``spread``); else the CPU, with the reason.
    """
    if not free:
        return CPU
    first = next(iter(free))
    if _room(free[first]) >= model_bytes:
        return DevicePlan(gpus=(first,))
    return spread(free, model_bytes, num_layers) or DevicePlan(reason=_no_fit(free, model_bytes))


def spread(free: Mapping[int, int], model_bytes: int, num_layers: int) -> DevicePlan | None:
    """A device_map over every GPU with room (each may lose up to one layer, twice the average, to
    indivisible blocks; spreading over all of them leaves the most room for activations), when there are
    at least two and together they hold the model; else None."""
    room = {gpu: _room(bytes_) for gpu, bytes_ in free.items()}
    block = 2 * -(-model_bytes // max(num_layers, 1))
    chosen = sorted(gpu for gpu, bytes_ in room.items() if bytes_ > block)
    if len(chosen) > 1 and sum(room[gpu] - block for gpu in chosen) >= model_bytes:
        return DevicePlan(gpus=tuple(chosen), max_memory={gpu: room[gpu] for gpu in chosen})
    return None


def plan_after_oom(plan: DevicePlan, free: Mapping[int, int], model_bytes: int, num_layers: int) -> DevicePlan:
    """What to try after the prune step ran out of GPU memory on ``plan``, given the free bytes of each GPU
    read after that attempt was freed: from one GPU, the node's GPUs through a device_map (``spread``) when
    together they hold the model, else the CPU; from several GPUs (or the CPU), the CPU. The reason says why."""
    if len(plan.gpus) == 1:
        following = spread(free, model_bytes, num_layers)
        if following is not None:
            return following
        if len(free) < 2:
            return DevicePlan(reason="no other GPU to spread the model over")
        return DevicePlan(reason=_no_fit(free, model_bytes, together=True))
    return DevicePlan(reason="the GPUs of the device_map ran out of memory" if plan.gpus else plan.reason)


def _room(free_bytes: int) -> int:
    """Bytes of weights a GPU with ``free_bytes`` free may hold (RESERVE_*)."""
    return max(0, int(free_bytes * (1 - RESERVE_FRACTION)) - RESERVE_BYTES)


def _no_fit(free: Mapping[int, int], model_bytes: int, together: bool = False) -> str:
    gib = 2**30
    where = f"{len(free)} GPUs together" if together else f"{len(free)} GPU(s)"
    return f"the model's {model_bytes / gib:.1f} GiB do not fit the {where}: {sum(free.values()) / gib:.1f} GiB free"


def _gpu_range(gpus: tuple[int, ...]) -> str:
    """'cuda:0-7' for consecutive GPUs, else 'cuda:0,2,5'."""
    if list(gpus) == list(range(gpus[0], gpus[0] + len(gpus))):
        return f"cuda:{gpus[0]}-{gpus[-1]}"
    return "cuda:" + ",".join(map(str, gpus))
