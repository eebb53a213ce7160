"""benchmarks/benchmark.py: the summary of a run timing only base, sam, xsam-nosearch and xsam-search (the GPU
check's), and the configurations of a reference checkout timed beside this one's."""

import pathlib

import pytest

import hf_xsam
from benchmark import Setup, load_reference, make_runner, markdown, summarise_times, time_task
from toy_tasks import build_task


def test_summary_of_the_four_configurations_of_the_gpu_check():
    # per round: base 10 ms, SAM 20 ms, XSAM 20.1 ms, a searching XSAM step 60.1 ms (the search costs 40 ms)
    times = {"base": [0.010] * 4, "sam": [0.020] * 4, "xsam-nosearch": [0.0201] * 4, "xsam-search": [0.0601] * 4}
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


def test_reference_configurations_are_paired_with_this_checkouts():
    # this checkout's SAM step 20 ms against the reference's 25 ms in every round
    times = {"base": [0.010] * 4, "sam": [0.020] * 4, "xsam-nosearch": [0.020] * 4, "xsam-search": [0.060] * 4}
    times |= {"sam@reference": [0.025] * 4, "xsam-nosearch@reference": [0.020] * 4}
    summary = summarise_times(times, search_every=400)
    assert summary["ratios"]["sam/sam@reference"][0] == pytest.approx(0.8)
    assert summary["ratios"]["xsam-nosearch/xsam-nosearch@reference"][0] == pytest.approx(1.0)
    table = markdown("vit", "small", summary, None, "CPU")
    assert "| sam@reference | 25.00 |" in table and "- sam/sam@reference: 0.800" in table


def test_reference_checkout_runs_beside_this_one(tmp_path):
    # the repository itself as the reference: its trainer class is another import of the same code
    reference = load_reference(str(pathlib.Path(__file__).parents[1]))
    assert reference.__name__ == "hf_xsam_reference" and reference.XSAMTrainer is not hf_xsam.XSAMTrainer
    task = build_task("vit", "small", seed=0)
    times = time_task(
        task,
        rounds=1,
        warmup=0,
        seed=0,
        clock_kind="cpu",
        setup=Setup(device="cpu", batch_size=4),
        configs=["base", "sam"],
        reference=reference,
    )
    assert sorted(times) == ["base", "sam", "sam@reference"]
    with pytest.raises(SystemExit, match="no hf_xsam/ package"):
        load_reference(str(tmp_path))


def test_unguarded_configurations_take_the_skip_guard_off(tmp_path):
    task = build_task("vit", "small", seed=0)
    setup = Setup(device="cpu", batch_size=4)
    guarded, unguarded = (
        make_runner(task, name, str(tmp_path), setup) for name in ("sam-adamw", "sam-adamw-unguarded")
    )
    guarded.unit()
    unguarded.unit()

    def installed_by(runner):
        return pathlib.Path(runner.trainer.optimizer.step.__code__.co_filename).name

    assert installed_by(guarded) == "skipping.py" and installed_by(unguarded) != "skipping.py"
    assert not unguarded.trainer.optimizer.defaults["fused"]  # the non-fused AdamW: a host read to skip
