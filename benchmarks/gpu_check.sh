#!/usr/bin/env bash
# The GPU check: the `cuda` tests, then the step benchmark on a ViT-Base in bf16 (base / sam / xsam-nosearch / search,
# the search amortised at one per 400 steps, CUDA max_memory_allocated per configuration), in at most
# 8 minutes. Writes OUTPUT_DIR/gpu_check.log, gpu_check.json (the summary), cuda_tests.xml and
# benchmark.json, and prints the summary. Without CUDA it says so and exits 0.
#
# Usage: benchmarks/gpu_check.sh [OUTPUT_DIR]     (default outputs/gpu_check; PYTHON picks the interpreter)
# Exit status: 0 when the tests passed and the benchmark ran (the speed and memory goals are reported, not
# enforced), 1 otherwise.
set -u
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
python=${PYTHON:-python}
mkdir -p "$out"
log="$out/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

probe="import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"
if ! device=$("$python" -c "$probe" 2>/dev/null); then
    torch_version=$("$python" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "not importable")
    message="CUDA is not available (torch $torch_version): no GPU check was run; run this on a machine with a GPU."
    echo "gpu_check: $message" | tee "$log"
    printf '{"cuda": false, "message": "%s"}\n' "$message" >"$out/gpu_check.json"
    exit 0
fi

echo "gpu_check: $device, output in $out" | tee "$log"
start=$(date +%s)
# 2.5 minutes for the tests (seconds each), 5 for the benchmark: 7.5 minutes at most, plus the summary
timeout 150 "$python" -m pytest -m cuda tests/cuda -p no:cacheprovider -q -o addopts=-ra \
    --junitxml="$out/cuda_tests.xml" 2>&1 | tee -a "$log"
tests_status=${PIPESTATUS[0]}
timeout 300 "$python" benchmarks/benchmark.py --device cuda --bf16 --tasks vit --size base --rounds 30 --warmup 3 \
    --search-every 400 --configs base sam xsam-nosearch xsam-search --memory-configs base sam xsam-nosearch xsam-search \
    --json "$out/benchmark.json" 2>&1 | tee -a "$log"
benchmark_status=${PIPESTATUS[0]}

"$python" - "$out" "$device" "$tests_status" "$benchmark_status" "$(($(date +%s) - start))" <<'EOF' 2>&1 | tee -a "$log"
"""Summarise the test report and the benchmark JSON against the goals, into gpu_check.json."""
import json
import os
import sys
import xml.etree.ElementTree as ElementTree

out, device, tests_status, benchmark_status, seconds = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
summary = {"cuda": True, "device": device, "seconds": seconds, "tests_exit_status": tests_status,
           "benchmark_exit_status": benchmark_status}
report = os.path.join(out, "cuda_tests.xml")
if os.path.exists(report):
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    summary["tests"] = counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
results = os.path.join(out, "benchmark.json")
if benchmark_status == 0 and os.path.exists(results):
    with open(results) as f:
        benchmark = json.load(f)
    vit = benchmark["tasks"]["vit"]
    ratios, memory = vit["timing"]["ratios"], vit["memory"]
    copies = {name: row["peak_extra_bytes"] / memory["parameter_bytes"] for name, row in memory["configs"].items()}
    figures = {
        "xsam-amortised/sam": ratios["xsam-amortised/sam"][0],
        "sam/base": ratios["sam/base"][0],
        "xsam-nosearch extra peak (parameter copies)": copies["xsam-nosearch"],
        "xsam-nosearch extra between steps (parameter copies)":
            memory["configs"]["xsam-nosearch"]["live_extra_parameter_copies"],
    }
    goals = {"xsam-amortised/sam": 1.01, "sam/base": 2.05, "xsam-nosearch extra peak (parameter copies)": 1.1,
             "xsam-nosearch extra between steps (parameter copies)": 1.1}
    summary["benchmark"] = f"vit ({benchmark['settings']['size']}, {vit['parameters'] / 1e6:.1f}M parameters), " + (
        f"{benchmark['device']}, search every {benchmark['settings']['search_every']} steps")
    summary["extra_peak_parameter_copies"] = copies
    summary["median_ms"] = {name: 1e3 * value for name, value in vit["timing"]["median_s"].items()}
    summary["peak_mib"] = {name: row["peak_bytes"] / 2**20 for name, row in memory["configs"].items()}
    summary["goals"] = {name: {"value": value, "goal": f"<= {goals[name]}", "met": value <= goals[name]}
                        for name, value in figures.items()}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(summary, f, indent=2)

print(f"\n== GPU check on {device}, {seconds} s ==")
if "tests" in summary:
    print("cuda tests: " + ", ".join(f"{value} {key}" for key, value in summary["tests"].items() if key != "tests"))
else:
    print(f"cuda tests: no report (exit status {tests_status})")
if "goals" in summary:
    print(f"benchmark: {summary['benchmark']}")
    for name, goal in summary["goals"].items():
        print(f"  {name}: {goal['value']:.3f} (goal {goal['goal']}: {'met' if goal['met'] else 'MISSED'})")
    print("  extra peak per configuration (parameter copies): "
          + ", ".join(f"{name} {value:.2f}" for name, value in summary["extra_peak_parameter_copies"].items()))
else:
    print(f"benchmark: no results (exit status {benchmark_status})")
EOF
[ "$tests_status" -eq 0 ] && [ "$benchmark_status" -eq 0 ]
