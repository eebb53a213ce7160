"""GPU counterparts of the precision tests, plus what only a GPU shows: synchronisation, device memory, a
model split across CPU and GPU. Every test is marked ``cuda`` and skipped where CUDA is absent.

The tests run on ``HF_XSAM_TEST_DEVICE`` (default ``cuda``). ``HF_XSAM_TEST_DEVICE=cpu`` runs the
device-generic ones on the CPU, which checks their logic where no GPU is at hand; it proves nothing about
CUDA. Each test says what only a GPU can check; the GPU-only ones skip on the CPU with that reason.

    python -m pytest -m cuda tests/cuda                          # on a machine with a GPU
    HF_XSAM_TEST_DEVICE=cpu python -m pytest -m cuda tests/cuda  # the logic, on the CPU
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import PretrainedConfig, TrainerCallback

from helpers import SequentialXSAMTrainer, TinyClassifier, as_dataset, flat, flat_loss, make_data
from hf_xsam import XSAM, XSAMTrainer, XSAMTrainingArguments
from reference import xsam_direction
from test_precision import BATCH, LR, InfInAscentPass, N, WeightsAfterEachStep, args_for, with_cpu_grad_scaler

DEVICE = torch.device(os.environ.get("HF_XSAM_TEST_DEVICE", "cuda"))
ON_CUDA = DEVICE.type == "cuda"
RHO, ALPHA = 0.2, 1.3  # the settings of test_precision.args_for

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="CUDA is not available"),
]
gpu_only = pytest.mark.skipif(not ON_CUDA, reason="only a GPU can check this (HF_XSAM_TEST_DEVICE is not cuda)")


def device_args(tmp_path, **overrides) -> XSAMTrainingArguments:
    """The settings of test_precision (the CPU versions of these tests, whose fault injection is reused), on DEVICE."""
    return args_for(tmp_path, use_cpu=not ON_CUDA, **overrides)


def batches(data: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches the sequential trainer sees."""
    return [{k: v[i * BATCH : (i + 1) * BATCH] for k, v in data.items()} for i in range(count)]


def on_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in batch.items()}


def forward_backward_on(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    def forward_backward() -> torch.Tensor:
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    return forward_backward


# ------------------------------------------------------------------------------------------------------
# fp16 with loss scaling


def fp16_scaler(trainer: XSAMTrainer) -> torch.amp.GradScaler:
    """The Trainer's own GradScaler on CUDA (on the CPU, where the Trainer makes none, test_precision's)."""
    if not ON_CUDA:
        return with_cpu_grad_scaler(trainer)
    scaler = trainer.accelerator.scaler
    assert scaler is not None, "the Trainer makes a GradScaler for fp16 on CUDA"
    # Start at 2**10 as a resumed checkpoint would: at the default 2**16 the scaled gradients of this tiny
    # model come near fp16's maximum (65504) and could overflow on their own, shifting the skipped step.
    state = scaler.state_dict()
    state["scale"] = 2.0**10
    scaler.load_state_dict(state)
    return scaler


def test_fp16_overflow_in_ascent_pass_skips_the_step_and_finite_steps_match_reference(tmp_path):
    # GPU only: that the Trainer's real GradScaler (made by Accelerate for CUDA) unscales, detects the inf
    # in XSAM's direction, skips and backs off; fp16 rounding of CUDA kernels. The CPU run uses a CPU scaler.
    model, data = TinyClassifier(dtype=torch.float32), make_data(n=N)
    first, _, third = [flat_loss(model, b) for b in batches(data, 3)]
    w0 = flat(model)
    # step 1 has an inf in its ascent pass and must be skipped: the reference takes steps 0 and 2 only
    expected_0 = w0 - LR * xsam_direction(first, w0, rho=RHO, alpha=ALPHA)[0]
    expected_2 = expected_0 - LR * xsam_direction(third, expected_0, rho=RHO, alpha=ALPHA)[0]
    weights = WeightsAfterEachStep()
    trainer = InfInAscentPass(
        model=model,
        args=device_args(tmp_path, max_steps=3, fp16=True),
        train_dataset=as_dataset(data),
        callbacks=[weights],
    )
    scaler = fp16_scaler(trainer)
    initial_scale = scaler.get_scale()
    trainer.train()
    assert next(model.parameters()).device.type == DEVICE.type
    assert torch.equal(weights.weights[1], weights.weights[0]), "the bad step must leave the weights bit-identical"
    assert not torch.equal(weights.weights[2], weights.weights[1]), "training continues after it"
    assert all(torch.isfinite(w).all() for w in weights.weights)
    assert scaler.get_scale() == initial_scale / 2, "the scaler halves its scale once"
    # fp16 keeps ~3 significant digits in the passes: close to the reference, and on CUDA visibly not fp32.
    # On the CPU the Trainer does not autocast to fp16 (the error seen there is fp32's, ~4e-8).
    lowest = 1e-7 if ON_CUDA else 0.0
    for got, expected in ((weights.weights[0], expected_0), (weights.weights[2], expected_2)):
        error = float((got.cpu() - expected).abs().max())
        assert lowest < error < 5e-3, error


# ------------------------------------------------------------------------------------------------------
# bf16


def test_bf16_weights_are_restored_bit_for_bit():
    # GPU only: CUDA's bf16 kernels (the foreach ones the engine uses) and their rounding.
    model = TinyClassifier(dtype=torch.bfloat16).to(DEVICE)
    batch = on_device(make_data())
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def loss_only() -> torch.Tensor:
        seen.append(any(not torch.equal(a, p) for a, p in zip(before, model.parameters())))
        return model(**batch)["loss"]

    engine = XSAM(model.parameters(), rho=0.05, ascent_steps=2, alpha_step=0.5)
    engine.step(forward_backward_on(model, batch), loss_only, step=0)
    assert seen and all(seen), "the search must have evaluated moved weights"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad.dtype == torch.bfloat16 and p.grad.device.type == DEVICE.type for p in model.parameters())


def test_bf16_autocast_step_is_close_to_fp32(tmp_path):
    # GPU only: CUDA's bf16 autocast (which ops run in bf16 differs from the CPU's).
    model, data = TinyClassifier(dtype=torch.float32), make_data(n=N)
    w0, loss = flat(model), flat_loss(model, batches(data, 1)[0])
    expected = w0 - LR * xsam_direction(loss, w0, rho=RHO, alpha=ALPHA)[0]
    trainer = SequentialXSAMTrainer(
        model=model, args=device_args(tmp_path, max_steps=1, bf16=True), train_dataset=as_dataset(data)
    )
    trainer.train()
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == DEVICE.type
    # bf16 keeps ~3 significant digits in the forward pass: close to fp32, but visibly not fp32
    error = float((flat(model).cpu() - expected).abs().max())
    assert 1e-6 < error < 1e-2, error


# ------------------------------------------------------------------------------------------------------
# no host-device synchronisation


class _ValueReadBackIsAnError(TorchDispatchMode):
    """The CPU stand-in for CUDA's sync debug mode: reading a tensor's value into Python is an error.

    It catches ``.item()``, ``bool()`` and ``float()`` of a tensor (``aten._local_scalar_dense``), which on a
    GPU wait for the device. It does not see ``.tolist()`` on CPU tensors, nor any real synchronisation.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("synchronizing operation: a tensor value was read back to the host")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Any host-device synchronisation inside raises ``RuntimeError``."""
    if not ON_CUDA:
        with _ValueReadBackIsAnError():
            yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class CheckSteps(TrainerCallback):
    """Runs the chosen optimizer steps, whole (every pass, the XSAM arithmetic, the optimizer), under
    :func:`no_host_sync`. The Trainer's logging comes after ``on_step_end``, outside the check."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.checked = steps, []
        self.stack = contextlib.ExitStack()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.stack.enter_context(no_host_sync())
            self.checked.append(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.stack.close()


def train_checking(tmp_path, steps: set[int], **overrides) -> CheckSteps:
    check = CheckSteps(steps)
    # Step 0 searches alpha (which reads losses back); no later step does. Logging only after step 3.
    # The Trainer's own NaN filter reads every step's loss back, a cost of the plain Trainer too: off.
    # Fused optimizers skip a non-finite step on the device; others cost one sync per step by design.
    settings = {
        "max_steps": 4,
        "logging_steps": 4,
        "logging_nan_inf_filter": False,
        "alpha_search_interval": 1000,
        "optim": "adamw_torch_fused",
    }
    settings.update(overrides)
    trainer = SequentialXSAMTrainer(
        model=TinyClassifier(dtype=torch.float32),
        args=device_args(tmp_path, **settings),
        train_dataset=as_dataset(make_data(n=4 * N)),
        callbacks=[check],
    )
    try:
        trainer.train()
    finally:
        check.stack.close()  # a step that raised never reached on_step_end
    return check


@pytest.mark.parametrize(
    "sam_method, accumulation",
    [("none", 1), ("sam", 1), ("xsam", 1), ("xsam", 2)],
    ids=["plain-trainer", "sam", "xsam", "xsam-accumulation"],
)
def test_steps_without_search_or_logging_make_no_host_sync(tmp_path, sam_method, accumulation):
    # GPU only: real synchronisations (CUDA's sync debug mode); on the CPU only value read-backs are seen.
    # "plain-trainer" is the control: if it fails, the Trainer itself synchronises, not XSAM.
    check = train_checking(tmp_path, {1, 2}, sam_method=sam_method, gradient_accumulation_steps=accumulation)
    assert check.checked == [1, 2]


def test_the_sync_check_catches_the_alpha_search(tmp_path):
    # the check can fail: the search reads its losses back to pick alpha, and step 0 searches
    with pytest.raises(RuntimeError, match="synchroniz"):
        train_checking(tmp_path, {0})


# ------------------------------------------------------------------------------------------------------
# memory


class DeepMLP(nn.Module):
    """Many equal layers, so that no single parameter is a large part of all of them (see the tolerance)."""

    def __init__(self, width: int = 512, depth: int = 16) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x, labels=None):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        logits = self.head(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def peak_training_bytes(tmp_path, sam_method: str, accumulation: int) -> tuple[int, int]:
    """Peak CUDA bytes allocated by 3 optimizer steps beyond what was allocated before them, and the bytes
    of the trainable parameters."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = DeepMLP().to(DEVICE)
    generator = torch.Generator().manual_seed(0)
    data = Dataset.from_dict(
        {
            "x": torch.randn(32, 512, generator=generator).tolist(),
            "labels": torch.randint(0, 3, (32,), generator=generator).tolist(),
        }
    )
    args = device_args(
        tmp_path,
        max_steps=3,
        sam_method=sam_method,
        gradient_accumulation_steps=accumulation,
        alpha_search_interval=0,
        logging_steps=100,
    )
    trainer = XSAMTrainer(model=model, args=args, train_dataset=data)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del trainer, model
    return peak, parameter_bytes


@gpu_only
def test_extra_memory_is_one_parameter_copy(tmp_path):
    # Tolerance: 0.15 parameter copies over the expected count. In the passes after the first, the
    # gradients already exist, so the backward briefly holds one layer's incoming gradient beside them
    # (1/16 of a copy for DeepMLP); the rest (norms, scalars) is kilobytes. XSAM and SAM run the same
    # arithmetic (no search here), so between them only 0.02 copies are allowed.
    peak_training_bytes(tmp_path / "warmup", "none", 1)  # cuBLAS workspaces and other one-time allocations
    peaks = {}
    for method, accumulation in [("none", 1), ("sam", 1), ("xsam", 1), ("none", 2), ("xsam", 2)]:
        peaks[method, accumulation], parameter_bytes = peak_training_bytes(
            tmp_path / f"{method}-{accumulation}", method, accumulation
        )
    copies = {key: (peak - peaks["none", key[1]]) / parameter_bytes for key, peak in peaks.items()}
    assert abs(copies["xsam", 1] - copies["sam", 1]) <= 0.02, copies
    assert 0.95 <= copies["xsam", 1] <= 1.15, copies
    assert 1.95 <= copies["xsam", 2] <= 2.15, copies


# ------------------------------------------------------------------------------------------------------
# a model split across CPU and GPU


class SplitClassifier(nn.Module):
    """TinyClassifier's layers with the first on the CPU and the second on the GPU, as ``device_map`` places
    offloaded layers."""

    def __init__(self) -> None:
        super().__init__()
        tiny = TinyClassifier(dtype=torch.float32)
        self.config = tiny.config
        self.fc1, self.fc2 = tiny.fc1.to("cpu"), tiny.fc2.to(DEVICE)
        self.hf_device_map = {"fc1": "cpu", "fc2": DEVICE.index or 0}

    def forward(self, x, labels=None):
        hidden = torch.tanh(self.fc1(x.to("cpu")))
        logits = self.fc2(hidden.to(DEVICE))
        return {"loss": F.cross_entropy(logits, labels.to(DEVICE)), "logits": logits}


class KeepPlacement(XSAMTrainingArguments):
    """Keeps the Trainer from moving the whole model to the GPU (it would for one GPU plus the CPU)."""

    @property
    def place_model_on_device(self) -> bool:
        return False


@gpu_only
def test_model_split_across_cpu_and_gpu_trains_or_is_refused(tmp_path):
    # Either outcome is accepted (the robustness work decides): training runs with finite weights and the
    # split intact, or XSAM refuses with a ValueError naming the device problem before any step is taken
    # (at the Trainer's construction or the engine's, which happens in the first training step).
    model = SplitClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    args = KeepPlacement(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        max_steps=3,
        optim="sgd",
        learning_rate=LR,
        rho=RHO,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    try:
        XSAMTrainer(model=model, args=args, train_dataset=as_dataset(make_data(n=N))).train()
    except ValueError as error:
        assert "device" in str(error), f"a refusal must name the device problem: {error}"
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "refused after a step"
        return
    assert model.fc1.weight.device.type == "cpu" and model.fc2.weight.device.type == DEVICE.type
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters())), "every layer trains"


# ------------------------------------------------------------------------------------------------------
# the alpha search's random-state replay


def search_losses(model: nn.Module, batch: dict[str, torch.Tensor], alpha_step: float) -> dict[float, float]:
    """The alpha search's loss at every alpha of the grid 0..2 with spacing ``alpha_step``."""
    engine = XSAM(model.parameters(), rho=0.05, alpha_step=alpha_step, alpha_search_interval=1)
    torch.manual_seed(0)  # both searches start from the same random state, so their ascents are identical
    engine.step(forward_backward_on(model, batch), lambda: model(**batch)["loss"], step=0)
    return dict(zip(engine.alpha_grid, engine.search_history[-1]["losses"]))


def test_alpha_search_replays_dropout_masks():
    # GPU only: the CUDA generator's state being saved and replayed (dropout on CUDA draws from it).
    # Two searches on the same step, with grids 0, 0.1, ... and 0, 0.2, ...: alpha = 0.4 is the 5th
    # evaluation of one and the 3rd of the other, at the same weights. Only a replayed random state gives
    # both the same dropout masks, hence the same loss.
    model, batch = TinyClassifier(dropout=0.5, dtype=torch.float32).to(DEVICE), on_device(make_data())
    with torch.no_grad():
        plain = [float(model(**batch)["loss"]) for _ in range(2)]
    assert plain[0] != plain[1], "dropout must change the loss between evaluations"
    fine, coarse = search_losses(copy.deepcopy(model), batch, 0.1), search_losses(copy.deepcopy(model), batch, 0.2)
    shared = sorted(set(fine) & set(coarse))
    assert len(shared) == len(coarse) == 11
    torch.testing.assert_close([fine[a] for a in shared], [coarse[a] for a in shared], rtol=1e-6, atol=1e-7)
    assert len(set(fine.values())) > 1, "the losses still differ between alphas"
