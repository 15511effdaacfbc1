"""What the ranks of a multi-GPU / multi-node run agree on: waiting for rank 0, and a shared output_dir.

Rank 0 alone writes the IGIA state and the pruned model under ``<output_dir>/gradprune``; every other
rank (on every node) then loads that model for phase 2. That works only if all nodes see the same
``output_dir`` (NFS, Lustre, a cloud file system). ``check_shared_output_dir`` proves it before
phase 1, with a file rank 0 writes and every rank must then see.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import GradPruneConfigError

T = TypeVar("T")
SEEN_WAIT_S = 20.0
"""How long a rank keeps looking for rank 0's marker (network file systems may cache a directory's
listing for some seconds); only a run that is going to fail waits this long."""


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def finish() -> None:
    """End of the run: every rank waits for the others, then the process group is destroyed, so its
    background threads stop before the interpreter exits (a two-rank gloo run whose rank 1 exited with a
    live group once aborted in teardown: "terminate called without an active exception")."""
    if is_distributed():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object); also a barrier."""
    if not is_distributed() or torch.distributed.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(work: Callable[[], T], what: str = "rank 0's step") -> T | None:
    """Run ``work`` on rank 0 while the other ranks wait; if it fails, every rank stops with the same
    one-line GradPruneConfigError (``one_line``, ``what`` naming the step) rather than waiting forever
    for a rank that died.

    ``work`` runs ``alone()``: swift's own barriers (dataset loading, preprocessing) are off inside it,
    since the other ranks are not there to meet them. With GRADPRUNE_DEBUG set rank 0 re-raises the
    original exception (its traceback) instead of the one line."""
    rank = torch.distributed.get_rank() if is_distributed() else 0
    result, failure = None, None
    if rank == 0:
        try:
            with alone():
                result = work()
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the other ranks learn of it
            failure = error
    message = broadcast_from_rank0(None if failure is None else one_line(failure, what))
    if message is None:
        return result
    if failure is not None and (isinstance(failure, GradPruneConfigError) or os.environ.get("GRADPRUNE_DEBUG")):
        raise failure
    raise GradPruneConfigError(message) from failure


def one_line(error: BaseException, what: str) -> str:
    """``error`` as the line every rank stops with: a GradPruneConfigError's own text, else which step
    failed (``what``) with the error's type and last line."""
    if isinstance(error, GradPruneConfigError):
        return str(error)
    return f"{what} failed: {type(error).__name__}: {last_line(error)} (GRADPRUNE_DEBUG=1 shows the traceback)"


def last_line(error: BaseException) -> str:
    """The last line of an error's message (where Python puts what went wrong), at most 300 characters."""
    return (str(error).strip().splitlines() or [""])[-1][:300]


@contextmanager
def alone() -> Iterator[None]:
    """Rank 0 working while the other ranks wait in a broadcast: swift's ``safe_ddp_context`` would
    otherwise call ``dist.barrier()`` after loading or preprocessing a dataset, a barrier the waiting
    ranks never reach (the run hangs). ms-swift's own switch turns those barriers off (file locks and
    plain runs stay as they are)."""
    try:
        from swift.utils import disable_safe_ddp_context_use_barrier
    except ImportError:  # the pure-torch parts of the package run without swift
        yield
        return
    with disable_safe_ddp_context_use_barrier():
        yield


def check_shared_output_dir(output_dir: str | Path) -> None:
    """Raise on every rank when some rank cannot see a file that rank 0 wrote in ``output_dir``."""
    if not is_distributed() or torch.distributed.get_world_size() == 1:
        return
    dist = torch.distributed
    rank = dist.get_rank()
    folder = Path(output_dir)
    token = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    marker = folder / f".gradprune_shared_{token[0]}"
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"written by rank 0 on {socket.gethostname()}\n", encoding="utf-8")
    dist.barrier()
    seen = _appears(marker, SEEN_WAIT_S)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname(), int(os.environ.get("GROUP_RANK", -1))))
    dist.barrier()  # every rank has looked before rank 0 removes it
    if rank == 0:
        marker.unlink(missing_ok=True)
    blind = [(rank_, host, node) for rank_, (seen_, host, node) in enumerate(views) if not seen_]
    if blind:
        where = ", ".join(f"rank {r} (node {n}, host {h})" if n >= 0 else f"rank {r} (host {h})" for r, h, n in blind)
        raise GradPruneConfigError(
            f"--output_dir {folder} is not shared between the nodes: {where} cannot see the file rank 0 wrote "
            "there, but rank 0 alone saves the pruned model that every rank trains in phase 2; put --output_dir "
            "on storage that every node mounts at the same path (NFS, Lustre, ...)"
        )


def _appears(path: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        # Listing the folder (not just stat) makes NFS revalidate a cached view of it.
        if path.parent.is_dir() and path.name in os.listdir(path.parent):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
