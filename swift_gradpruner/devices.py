"""Where the prune step runs the model: rank 0's GPU, the node's GPUs through a device_map, or the CPU.

A bf16 model above ~35B does not fit one 80 GB card; the criterion and the guard then ran on the CPU
for hours while the other GPUs idled. ``plan_devices`` chooses from numbers alone (free memory per
GPU, checkpoint size), so the choice is tested without a GPU; ``checkpoint.py`` probes the GPUs and
loads the model as the plan says (transformers' ``from_pretrained(device_map=..., max_memory=...)``,
which leaves the placement of the layers to accelerate). The criteria, the guard and the surgery take
a model whose layers sit on several GPUs (accelerate's hooks move the hidden states between them).
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
    when together they hold it (each may lose up to one layer, twice the average, to indivisible blocks;
    spreading over all of them leaves the most room for activations); else the CPU, with the reason.
    """
    if not free:
        return CPU
    room = {gpu: max(0, int(bytes_ * (1 - RESERVE_FRACTION)) - RESERVE_BYTES) for gpu, bytes_ in free.items()}
    first = next(iter(room))
    if room[first] >= model_bytes:
        return DevicePlan(gpus=(first,))
    block = 2 * -(-model_bytes // max(num_layers, 1))
    chosen = [gpu for gpu, bytes_ in room.items() if bytes_ > block]
    if len(chosen) > 1 and sum(room[gpu] - block for gpu in chosen) >= model_bytes:
        return DevicePlan(gpus=tuple(sorted(chosen)), max_memory={gpu: room[gpu] for gpu in sorted(chosen)})
    gib = 2**30
    return DevicePlan(reason=f"the model's {model_bytes / gib:.1f} GiB do not fit the {len(free)} GPU(s): "
                             f"{sum(free.values()) / gib:.1f} GiB free")  # fmt: skip


def _gpu_range(gpus: tuple[int, ...]) -> str:
    """'cuda:0-7' for consecutive GPUs, else 'cuda:0,2,5'."""
    if list(gpus) == list(range(gpus[0], gpus[0] + len(gpus))):
        return f"cuda:{gpus[0]}-{gpus[-1]}"
    return "cuda:" + ",".join(map(str, gpus))
