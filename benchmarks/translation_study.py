#!/usr/bin/env python
"""Translation study: AdamW vs SAM vs XSAM (and named configurations) on little Multi30k De->En data, over seeds.

``benchmarks/study.py --task multi30k`` under its own name, with the same flags but ``--task`` and
``--label_noise``: benchmarks/tasks.py says what the task runs and records (a Marian model and a tokenizer built
from scratch, the test set translated with the final weights and with the best epoch's), docs/study.md what the
configuration names mean. The data folder comes from ``--data_dir`` or the environment variable ``MULTI30K_DIR``;
it holds the Multi30k release as JSON lines (``tasks.MULTI30K_FILES``). Runs go to ``runs/translation-study``
unless ``--output_dir`` names another folder.

Example:
    python benchmarks/translation_study.py --data_dir /data/multi30k --rho 0.05 --seeds 0 1 2 \\
        --config cheap="--sam_method xsam --sam_start_ratio 0.5 --sam_interval 2 --sam_reuse true" \\
        --output_dir runs/multi30k --name multi30k

Produces: docs/study.md ("Translation: Multi30k with little data").
"""

from __future__ import annotations

import study

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    study.main(argv, "multi30k", "benchmarks/translation_study.py", __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
