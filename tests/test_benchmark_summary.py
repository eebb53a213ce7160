"""benchmarks/benchmark.py: the summary of a run timing only base, sam, xsam and xsam-search (the GPU check's)."""

import pytest

from benchmark import markdown, summarise_times


def test_summary_of_the_four_configurations_of_the_gpu_check():
    # per round: base 10 ms, SAM 20 ms, XSAM 20.1 ms, a searching XSAM step 60.1 ms (the search costs 40 ms)
    times = {"base": [0.010] * 4, "sam": [0.020] * 4, "xsam": [0.0201] * 4, "xsam-search": [0.0601] * 4}
    summary = summarise_times(times, search_every=400)
    # amortised: 20.1 ms + 40 ms / 400 = 20.2 ms per step, 1.01 times SAM's 20 ms
    assert summary["median_s"]["xsam-amortised"] == pytest.approx(0.0202)
    assert summary["ratios"]["xsam-amortised/sam"][0] == pytest.approx(1.01)
    assert summary["ratios"]["sam/base"][0] == pytest.approx(2.0)
    assert summary["decomposition_s"] == {"search": pytest.approx(0.040)}
    # 40 ms is 2 % of a 20 ms SAM step when searching every 100 steps
    assert summary["search_every_for_2_percent"] == pytest.approx(100)
    assert "sam-k2" not in str(summary["ratios"])
    table = markdown("vit", "base", summary, None, "a GPU, bf16 autocast")
    assert "- xsam-amortised/sam: 1.010" in table and "- sam/base: 2.000" in table
    assert table.index("| base |") < table.index("| sam |") < table.index("| xsam-amortised |")
