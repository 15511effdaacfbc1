"""Run several ``swift sft --gradprune true`` runs ("cells") one after another in this process, on every
rank of a torchrun launch (or alone), and write what each rank saw to a JSON-lines file.

    python -m torch.distributed.run --nproc_per_node 2 tests/multirank_cells.py cells.json out.jsonl

Each cell goes through ``gradprune_sft_main``, the function ``swift sft --gradprune true`` calls, with
its own --output_dir: one process start per launch instead of one per cell (the start-up of swift,
torch and DeepSpeed is most of a tiny run's time). A cell that fails is recorded with its error line and
the next cell runs; the process group ends as the CLI ends it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(cells_file: str, out_file: str) -> None:
    from swift_gradpruner.config import GradPruneConfigError
    from swift_gradpruner.report import read_report
    from swift_gradpruner.swift.distributed import finish
    from swift_gradpruner.swift.entry import gradprune_sft_main

    cells = json.loads(Path(cells_file).read_text())
    for name, argv in cells.items():
        start = time.perf_counter()
        row: dict = {"cell": name}
        try:
            result = gradprune_sft_main(argv)
            pruned = Path(result["gradprune"]["pruned_model"])
            report = read_report(pruned)
            row.update(pruned_model=str(pruned), checkpoint=result.get("last_model_checkpoint"),
                       dropped=report["dropped_layers"], merged=report["merged_layers"],
                       layer_scores=report.get("layer_scores"), layers_after=report["num_layers_after"],
                       timed="inference_benchmark" in report, phase1=report.get("phase1"))  # fmt: skip
        except GradPruneConfigError as error:
            row["error"] = str(error)
        row.update(rank=_rank(), seconds=round(time.perf_counter() - start, 1))
        with open(out_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    finish()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


if __name__ == "__main__":
    main(*sys.argv[1:3])
