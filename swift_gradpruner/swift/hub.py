"""The base model's weights on local disk before the prune step reads them.

``swift sft --model <org>/<name>`` parses its arguments with ``download_model=False``: swift fetches the
config and tokenizer files only and downloads the weights later, when it loads the model. The prune step
reads the base weights itself (rank 0, before swift loads anything when there is no phase 1), so rank 0
first asks swift's own hub function for them, exactly as ``get_model_processor`` does when it loads a
model: ``get_model_info_meta(..., download_model=True)`` with the run's --use_hf, --model_revision,
--hub_token and the model's own ignore patterns. The files land in the folder swift already resolved
(``args.model_dir``); on several nodes it is rank 0's copy, and the other nodes' phase 1 (if any)
downloads through swift as always.
"""

from __future__ import annotations

import time
from pathlib import Path

from .keys import from_hub


def fetch_weights(args) -> float | None:
    """Download the weights of a hub --model into ``args.model_dir`` (rank 0); the seconds it took, or None
    for a local folder (nothing to do)."""
    if not from_hub(args):
        return None
    from swift.model import get_model_info_meta
    from swift.utils import get_logger

    start = time.perf_counter()
    get_logger().info(f"[GradPruner] fetching the weights of {args.model} (swift's parsing fetched its config and "
                      "tokenizer only; the prune step reads the weights on rank 0)")  # fmt: skip
    info, _ = get_model_info_meta(**{**args.get_model_kwargs(), "download_model": True})
    if Path(info.model_dir).resolve() != Path(args.model_dir).resolve():  # e.g. the hub's main moved since parsing
        get_logger().info(f"[GradPruner] {args.model} resolved to {info.model_dir} (parsing saw {args.model_dir})")
        args.model_dir = info.model_dir
    return time.perf_counter() - start
