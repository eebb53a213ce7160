"""The generalization study's summary table."""

import statistics

from compare import table


def test_table_reports_mean_and_spread_per_method():
    runs = [
        {"method": "none", "seed": 0, "eval_accuracy": 0.50, "wall_s": 10.0},
        {"method": "none", "seed": 1, "eval_accuracy": 0.54, "wall_s": 12.0},
        {"method": "xsam", "seed": 0, "eval_accuracy": 0.61, "wall_s": 20.0},
        {"method": "xsam", "seed": 1, "eval_accuracy": 0.59, "wall_s": 22.0},
    ]
    lines = table(runs, ["eval_accuracy"], ["none", "xsam"]).splitlines()
    assert lines[0] == "| method | eval_accuracy | wall time (s) | seeds |"
    spread = statistics.stdev([0.61, 0.59])
    assert lines[3] == f"| xsam | 0.6 ± {spread:.2g} | 21 ± {statistics.stdev([20.0, 22.0]):.2g} | 2 |"
    assert lines[2].startswith("| none | 0.52 ± ")
