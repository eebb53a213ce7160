"""Two real DDP workers (torchrun, gloo) against the single-process float64 reference."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_worker import ETA

from helpers import RoutedClassifier, TinyClassifier, flat, flat_loss, make_data
from reference import gradient, orthogonal_part, reused_direction, xsam_direction

TESTS = Path(__file__).parent
LR, WORLD = 0.5, 2
# (mode, gradient accumulation, optimizer steps, steps that search alpha, ASAM's eta or None): 16 examples, 2 per
# worker and micro-batch, so an epoch is 4 steps without accumulation and 2 with it
EXPECTED = {
    "local": ("local", 1, 6, {0, 4}, None),
    "global": ("global", 1, 6, {0, 4}, None),
    "local_accumulation": ("local", 2, 3, {0, 2}, None),
    "global_accumulation": ("global", 2, 3, {0, 2}, None),
    "local_asam": ("local", 1, 6, {0, 4}, ETA),
    "global_asam_accumulation": ("global", 2, 3, {0, 2}, ETA),
}
# the schedules of cheap configurations: (mode, accumulation, steps, search steps, first sharpness-aware step,
# sam_interval, fixed alpha or None, reuse scale or None, ASAM's eta or None)
SCHEDULES = {
    "local_reuse": ("local", 1, 6, set(), 0, 2, 1.3, 0.7, None),
    "global_reuse_accumulation": ("global", 2, 4, set(), 0, 2, 1.3, 0.5, None),
    "local_start_accumulation": ("local", 2, 4, {2}, 2, 1, None, None, None),
    "local_asam_reuse_accumulation": ("local", 2, 4, set(), 0, 2, 1.3, 5.0, ETA),
}


def torchrun(worker: str, out: Path, result_prefix: str) -> list[dict]:
    """Run ``worker`` on WORLD processes and load what each rank saved."""
    # the checkout's root too: the workers must import this checkout's hf_xsam, not an installed one
    paths = [str(TESTS), str(TESTS.parent), str(TESTS.parent.parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        str(TESTS / worker),
        str(out),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"{result_prefix}{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return torchrun("dist_worker.py", tmp_path_factory.mktemp("ddp"), "rank")


def cat(batches):
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def as_float64(batch):
    return {"x": batch["x"].double(), "labels": batch["labels"]}


def scaled(loss, factor):
    return lambda w: factor * loss(w)


def expected_weights(
    seen,
    mode,
    accumulation,
    steps,
    search_steps,
    rho=0.3,
    first=0,
    interval=1,
    alpha=None,
    reuse_scale=None,
    model_class=TinyClassifier,
    eta=None,
    arcs=None,
):
    """Float64 SGD over what every worker saw: sharpness-aware steps from ``first`` every ``interval`` steps, plain
    steps (plus the kept direction with ``reuse_scale``) otherwise; alpha fixed, or searched on ``search_steps``;
    ASAM's ascent with ``eta``. The losses of each search (averaged over workers; each micro-batch's own mean, as the
    engine records them) are appended to ``arcs``."""
    arcs = [] if arcs is None else arcs
    model = model_class()
    w, alpha, kept = flat(model), 1.0 if alpha is None else alpha, None
    for step in range(steps):
        micro = [[as_float64(seen[r][step * accumulation + m]) for m in range(accumulation)] for r in range(WORLD)]
        search = step in search_steps
        losses = [
            [scaled(flat_loss(model, micro[r][m]), 1 / accumulation) for m in range(accumulation)]
            for r in range(WORLD)
        ]
        if step < first or (step - first) % interval:  # plain: DDP averages the accumulated gradients
            direction = sum(gradient(loss, w) for rank in losses for loss in rank) / WORLD
            if reuse_scale is not None and kept is not None:
                direction = reused_direction(direction, kept, reuse_scale)
        elif mode == "global":  # one device on the global batch: each micro-batch concatenated over workers
            direction = kept = 0
            for m in range(accumulation):
                loss = scaled(flat_loss(model, cat([micro[r][m] for r in range(WORLD)])), 1 / accumulation)
                d, alpha, arc = xsam_direction(
                    loss, w, rho=rho, alpha=alpha, search=search and m == 0, adaptive_eta=eta
                )
                arcs += [[accumulation * loss for loss in arc]] if arc else []  # as the micro-batch's own mean
                # the kept direction: the mean over the micro-batches of their measured orthogonal parts
                direction, kept = direction + d, kept + orthogonal_part(d, gradient(loss, w)) / accumulation
        else:  # each worker its own direction; search losses averaged over workers, then the directions
            if search:  # each worker at its own radius with ASAM's ascent (its own climb's length)
                arc = torch.tensor(
                    [
                        xsam_direction(flat_loss(model, micro[r][0]), w, rho=rho, search=True, adaptive_eta=eta)[2]
                        for r in range(WORLD)
                    ]
                ).mean(0)
                alpha = round(0.1 * int(torch.argmax(arc)), 10)
                arcs.append(arc.tolist())
            directions = [
                xsam_direction(loss, w, rho=rho, alpha=alpha, adaptive_eta=eta)[0] for rank in losses for loss in rank
            ]
            direction = sum(directions) / WORLD
            firsts = [gradient(loss, w) for rank in losses for loss in rank]
            kept = sum(orthogonal_part(d, g) for d, g in zip(directions, firsts)) / (WORLD * accumulation)
        w = w - LR * direction
    return w, alpha


@pytest.mark.parametrize("case", list(SCHEDULES))
def test_ddp_cheap_schedules_match_the_reference_and_keep_ranks_equal(ranks, case):
    mode, accumulation, steps, search_steps, first, interval, alpha, reuse_scale, eta = SCHEDULES[case]
    seen = [ranks[r][case]["seen"] for r in range(WORLD)]
    expected, alpha = expected_weights(
        seen, mode, accumulation, steps, search_steps, first=first, interval=interval, alpha=alpha,
        reuse_scale=reuse_scale, eta=eta,
    )  # fmt: skip
    assert torch.equal(ranks[0][case]["weights"], ranks[1][case]["weights"])
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][case]["weights"], expected, rtol=1e-9, atol=1e-10)
        assert set(ranks[r][case]["searches"]) == search_steps


@pytest.mark.parametrize("case", list(EXPECTED))
def test_ddp_matches_single_process_reference(ranks, case):
    mode, accumulation, steps, search_steps, eta = EXPECTED[case]
    seen = [ranks[r][case]["seen"] for r in range(WORLD)]
    assert not torch.equal(seen[0][0]["x"], seen[1][0]["x"]), "workers must see different data"
    arcs = []
    expected, alpha = expected_weights(seen, mode, accumulation, steps, search_steps, eta=eta, arcs=arcs)
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][case]["weights"], expected, rtol=1e-9, atol=1e-10)
        assert ranks[r][case]["alpha"] == pytest.approx(alpha)
        assert set(ranks[r][case]["searches"]) == search_steps
        # the losses along the arc, so the radii too (with ASAM's ascent in "local", each worker's own climb's)
        searched = [record["losses"] for record in ranks[r][case]["search_history"]]
        assert len(searched) == len(arcs) == len(search_steps)
        for losses, arc in zip(searched, arcs):
            assert losses == pytest.approx(arc, rel=1e-6)  # the engine keeps losses in float32


def test_workers_end_identical(ranks):
    for case in EXPECTED:
        assert torch.equal(ranks[0][case]["weights"], ranks[1][case]["weights"]), case
        assert ranks[0][case]["logged_alpha"] == ranks[1][case]["logged_alpha"], case


def test_coarse_to_fine_search_takes_the_same_branches_on_every_worker(ranks):
    first, second = ranks[0]["local_coarse_to_fine"], ranks[1]["local_coarse_to_fine"]
    assert not torch.equal(first["seen"][0]["x"], second["seen"][0]["x"]), "workers must see different data"
    # theta is each worker's own ("local" ascent); what was evaluated, the averaged losses and the choice are shared
    shared = [
        [{k: s[k] for k in ("step", "alpha", "alphas", "losses")} for s in r["search_history"]]
        for r in (first, second)
    ]
    assert shared[0] == shared[1] and len(shared[0]) == 6
    assert torch.equal(first["weights"], second["weights"]) and first["alpha"] == second["alpha"]
    for record in first["search_history"]:
        assert len(record["alphas"]) == len(record["losses"]) <= 9
        best = max(record["losses"])
        assert record["losses"][record["alphas"].index(record["alpha"])] == best


def test_resume_from_multi_worker_checkpoint(ranks):
    for r in range(WORLD):
        assert torch.equal(ranks[r]["resume"]["straight"], ranks[r]["resume"]["resumed"])
        assert ranks[r]["resume"]["alphas"][0] == ranks[r]["resume"]["alphas"][1]


@pytest.mark.parametrize("mode", ["local", "global"])
@pytest.mark.parametrize("eta", [None, ETA], ids=["sam_ascent", "asam_ascent"])
def test_ddp_with_a_head_one_rank_does_not_use(ranks, mode, eta):
    """ddp_find_unused_parameters: the ranks stay equal and match the reference, in which a head a worker did not use
    has a zero gradient there; the optimizer sees the gradients plain DDP gives it (none for a head no rank used)."""
    name = f"routed_{mode}" + ("_asam" if eta is not None else "")
    case = ranks[0][name], ranks[1][name]
    seen = [case[r]["seen"] for r in range(WORLD)]
    expected, _ = expected_weights(seen, mode, 2, 3, {0, 2}, model_class=RoutedClassifier, eta=eta)
    for r in range(WORLD):
        torch.testing.assert_close(case[r]["weights"], expected, rtol=1e-9, atol=1e-10)
    assert torch.equal(case[0]["weights"], case[1]["weights"])
    used = {name for name, _ in RoutedClassifier().named_parameters() if not name.startswith("spare")}
    plain = [ranks[r]["routed_none"]["graded"] for r in range(WORLD)]
    assert plain[0] == plain[1] == [used, used, {name for name in used if not name.startswith("b.")}]
    assert case[0]["graded"] == case[1]["graded"] == plain[0]


@pytest.mark.parametrize("mode", ["local", "global"])
def test_ddp_with_sam_interval_and_a_head_unused_on_the_next_plain_step(ranks, mode):
    """A head used on a sharpness-aware step (its passes under no_sync) and not reached on the plain step after it:
    DDP must not all-reduce an undefined gradient for it. The ranks stay equal and match the reference."""
    case = ranks[0][f"routed_interval_{mode}"], ranks[1][f"routed_interval_{mode}"]
    seen = [case[r]["seen"] for r in range(WORLD)]
    assert not any((batch["x"][:, 0] < 0).any() for batch in seen[1][2:4]), "rank 1 must not reach head b on step 1"
    expected, _ = expected_weights(seen, mode, 2, 3, set(), interval=2, alpha=1.3, model_class=RoutedClassifier)
    assert torch.equal(case[0]["weights"], case[1]["weights"])
    for r in range(WORLD):
        torch.testing.assert_close(case[r]["weights"], expected, rtol=1e-9, atol=1e-10)


def test_the_engine_adds_one_all_reduce_per_step_in_local_mode(ranks):
    def per_step(counts):
        return [b - a for a, b in zip([0, *counts], counts)]

    for r in range(WORLD):
        plain, local = per_step(ranks[r]["count_none"]), per_step(ranks[r]["count_local"])
        assert [x - p for x, p in zip(local, plain)] == [1] * 4, (local, plain)
        # with a head unused on a rank too (step 1 does not search)
        routed = (
            per_step(ranks[r]["routed_local"]["all_reduces"])[1] - per_step(ranks[r]["routed_none"]["all_reduces"])[1]
        )
        assert routed == 1


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch_fused"])
def test_a_nonfinite_pass_on_one_worker_skips_the_step_on_all(ranks, optim):
    results = [ranks[r][f"nonfinite-{optim}"] for r in range(WORLD)]
    for result in results:
        before, after, last = result["weights"][1:4]
        assert torch.equal(after, before), "step 1 is skipped"
        assert not torch.equal(last, after) and torch.isfinite(last).all(), "training continues"
    assert torch.equal(results[0]["weights"][-1], results[1]["weights"][-1])
    # the count is averaged over workers: one of two saw it
    assert results[0]["nonfinite"] == results[1]["nonfinite"] == [0, 0.5, 0]


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    return torchrun("fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), "fsdp_rank")


@pytest.mark.parametrize("run, eta", [("xsam", None), ("asam", 0.05)])
def test_fsdp2_sharded_engine_equals_one_device_on_the_global_batch(fsdp_ranks, run, eta):
    """The engine on shards (and with ASAM's ascent, ``T`` of the local shards and the norms over the shards) against
    the reference on the whole model and the global batch."""
    from fsdp_worker import BATCH, RUNS, STEPS

    assert RUNS[run].get("sam_adaptive_eta") == eta

    data = make_data(n=STEPS * BATCH * WORLD)
    seen = [
        [{k: v[(s * WORLD + r) * BATCH : (s * WORLD + r + 1) * BATCH] for k, v in data.items()} for s in range(STEPS)]
        for r in range(WORLD)
    ]
    expected, alpha = expected_weights(seen, "global", 1, STEPS, {0, 2}, eta=eta)
    for result in (rank[run] for rank in fsdp_ranks):
        assert result["sharded"] and 0 < result["local_numel"] < expected.numel()
        torch.testing.assert_close(result["weights"].detach(), expected, rtol=1e-9, atol=1e-10)
        assert result["alpha"] == pytest.approx(alpha)
