"""XSAMTrainer against the float64 reference, plain Trainer, real tiny models, logging and resume."""

import json
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from helpers import SequentialXSAMTrainer, TinyClassifier, as_dataset, flat, flat_loss, make_data, training_args
from hf_xsam import XSAMTrainer, XSAMTrainerMixin, XSAMTrainingArguments
from hf_xsam.state import STATE_NAME as XSAM_STATE_NAME
from reference import gradient, orthogonal_part, reused_direction, xsam_direction

N, BATCH, STEPS, LR = 12, 4, 6, 0.5


def xsam_args(tmp_path, **overrides):
    settings = dict(
        # the paper's rule, which tests/reference.py implements: alpha > 1 from the first search, grid 0..2 with SGD
        extrapolate_after_drop=0.0,
        alpha_max=2.0,
        per_device_train_batch_size=BATCH,
        max_steps=STEPS,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    settings.update(overrides)
    return training_args(tmp_path, **settings)


def reference_run(
    model,
    data,
    *,
    rho,
    k=1,
    alpha=1.0,
    search_every_epoch=False,
    loss_scale=1.0,
    label_smoothing=0.0,
    momentum=0.0,
    clip=0.0,
    sam_interval=1,
    first_sharpness_aware_step=0,
    reuse_scale=None,
    alpha_max=2.0,
    adaptive_eta=None,
):
    """Float64 XSAM over the batches in order, epochs of N / BATCH steps, SGD (optionally with momentum).

    Sharpness-aware steps start at ``first_sharpness_aware_step`` and come every ``sam_interval`` steps from it;
    the others use the plain gradient, plus the kept orthogonal part of the last sharpness-aware direction when
    ``reuse_scale`` is given (LookSAM). With ``search_every_epoch`` the first sharpness-aware step of every epoch
    searches alpha. ``adaptive_eta``: ASAM's ascent with that eta.
    """
    w, buffer, alphas, kept, searched_epoch = flat(model), None, [], torch.zeros_like(flat(model)), None
    for step in range(STEPS):
        start = (step * BATCH) % N
        batch = {key: value[start : start + BATCH] for key, value in data.items()}
        base = flat_loss(model, batch, label_smoothing)
        loss = (lambda f: lambda v: loss_scale * f(v))(base)
        epoch = step * BATCH // N
        sharpness_aware = (
            step >= first_sharpness_aware_step and (step - first_sharpness_aware_step) % sam_interval == 0
        )
        if not sharpness_aware:
            d = gradient(loss, w)
            if reuse_scale is not None:
                d = reused_direction(d, kept, reuse_scale)
        else:
            search = search_every_epoch and (searched_epoch is None or epoch > searched_epoch)
            searched_epoch = epoch if search else searched_epoch
            d, alpha, _ = xsam_direction(
                loss, w, rho=rho, k=k, alpha=alpha, search=search, alpha_max=alpha_max, adaptive_eta=adaptive_eta
            )
            kept = orthogonal_part(d, gradient(loss, w))
        if clip:
            d = d * min(1.0, clip / (float(d.norm()) + 1e-6))
        buffer = d if buffer is None else momentum * buffer + d
        w = w - LR * buffer
        alphas.append(alpha)
    return w, alphas


CASES = {
    "sam_k1": (dict(sam_method="sam", rho=0.2), dict(rho=0.2)),
    "sam_k3": (dict(sam_method="sam", rho=0.2, ascent_steps=3), dict(rho=0.2, k=3)),
    "alpha0": (dict(rho=0.2, alpha=0.0, alpha_search_interval=0), dict(rho=0.2, alpha=0.0)),
    "alpha_fixed": (dict(rho=0.2, alpha=1.4, alpha_search_interval=0), dict(rho=0.2, alpha=1.4)),
    "search_k1": (dict(rho=0.3), dict(rho=0.3, search_every_epoch=True)),
    "search_k2": (dict(rho=0.3, ascent_steps=2), dict(rho=0.3, k=2, search_every_epoch=True)),
    # the default grid with SGD ends at SAM's alpha
    "search_sgd_default_grid": (dict(rho=0.3, alpha_max=None), dict(rho=0.3, search_every_epoch=True, alpha_max=1.0)),
    "clipping": (dict(rho=0.2, max_grad_norm=0.05), dict(rho=0.2, search_every_epoch=True, clip=0.05)),
    "sam_interval": (
        dict(rho=0.2, sam_interval=2, alpha=1.2, alpha_search_interval=0),
        dict(rho=0.2, sam_interval=2, alpha=1.2),
    ),
    # max_steps 6: steps 0-2 plain, the first search at step 3
    "start_ratio": (
        dict(rho=0.3, sam_start_ratio=0.5),
        dict(rho=0.3, search_every_epoch=True, first_sharpness_aware_step=3),
    ),
    "start_interval_search": (
        dict(rho=0.3, sam_start_ratio=0.2, sam_interval=2),
        dict(rho=0.3, search_every_epoch=True, first_sharpness_aware_step=2, sam_interval=2),
    ),
    "reuse": (
        dict(rho=0.2, sam_interval=3, alpha=1.3, alpha_search_interval=0, sam_reuse=True, sam_reuse_scale=0.5),
        dict(rho=0.2, sam_interval=3, alpha=1.3, reuse_scale=0.5),
    ),
    "reuse_search_clipping": (
        dict(rho=0.3, sam_interval=2, sam_reuse=True, max_grad_norm=0.05),
        dict(rho=0.3, sam_interval=2, search_every_epoch=True, reuse_scale=0.7, clip=0.05),
    ),
    # ASAM's ascent, searched alpha: the search radius is the climb's Euclidean length times rho_max / rho
    "search_k2_asam": (
        dict(rho=1.0, ascent_steps=2, sam_adaptive=True, sam_adaptive_eta=0.05),
        dict(rho=1.0, k=2, search_every_epoch=True, adaptive_eta=0.05),
    ),
    "label_smoothing": (
        dict(rho=0.2, label_smoothing_factor=0.1),
        dict(rho=0.2, search_every_epoch=True, label_smoothing=0.1),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainer_matches_reference(tmp_path, case):
    trainer_settings, reference_settings = CASES[case]
    model, data = TinyClassifier(), make_data(n=N)
    expected, alphas = reference_run(model, data, **reference_settings)
    trainer = SequentialXSAMTrainer(
        model=model, args=xsam_args(tmp_path, **trainer_settings), train_dataset=as_dataset(data)
    )
    trainer.train()
    # the Trainer's LabelSmoother sums in another order than F.cross_entropy: agreement to ~1e-8 there
    tolerance = 1e-6 if case == "label_smoothing" else 1e-9
    torch.testing.assert_close(flat(model), expected, rtol=tolerance, atol=tolerance / 10)
    assert trainer.xsam.alpha == pytest.approx(alphas[-1])


def test_custom_compute_loss_and_user_optimizer(tmp_path):
    class TripledLoss(SequentialXSAMTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            return (3 * outputs["loss"], outputs) if return_outputs else 3 * outputs["loss"]

    model, data = TinyClassifier(), make_data(n=N)
    expected, _ = reference_run(model, data, rho=0.2, search_every_epoch=True, loss_scale=3.0, momentum=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    trainer = TripledLoss(
        model=model, args=xsam_args(tmp_path, rho=0.2), train_dataset=as_dataset(data), optimizers=(optimizer, None)
    )
    trainer.train()
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "settings, reference",
    [(dict(rho=0.2), dict(rho=0.2)), (dict(rho=1.0, sam_adaptive=True), dict(rho=1.0, adaptive_eta=0.01))],
)
def test_gradient_accumulation_averages_micro_batch_directions(tmp_path, settings, reference):
    model, data = TinyClassifier(), make_data(n=N)
    w = flat(model)
    for step in range(2):  # two optimizer steps of 2 x 2 examples, fixed alpha
        start = step * 4
        halves = [{k: v[start + i : start + i + 2] for k, v in data.items()} for i in (0, 2)]
        w = w - LR * sum(xsam_direction(flat_loss(model, h), w, alpha=1.5, **reference)[0] for h in halves) / 2
    args = xsam_args(
        tmp_path,
        **settings,
        alpha=1.5,
        alpha_search_interval=0,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    SequentialXSAMTrainer(model=model, args=args, train_dataset=as_dataset(data)).train()
    torch.testing.assert_close(flat(model), w, rtol=1e-9, atol=1e-10)


def test_method_none_is_plain_trainer_bit_for_bit(tmp_path):
    data = as_dataset(make_data(n=N))
    plain_args = dict(
        output_dir=str(tmp_path / "plain"),
        per_device_train_batch_size=BATCH,
        max_steps=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=3,
    )
    plain = TinyClassifier(dtype=torch.float32)
    Trainer(model=plain, args=TrainingArguments(**plain_args), train_dataset=data).train()
    xsam = TinyClassifier(dtype=torch.float32)
    plain_args["output_dir"] = str(tmp_path / "xsam")
    XSAMTrainer(model=xsam, args=XSAMTrainingArguments(sam_method="none", **plain_args), train_dataset=data).train()
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), xsam.parameters()))


def test_frozen_parameters_stay_put(tmp_path):
    model = TinyClassifier()
    model.fc1.requires_grad_(False)
    frozen = [p.detach().clone() for p in model.fc1.parameters()]
    trainable_before = model.fc2.weight.detach().clone()
    XSAMTrainer(model=model, args=xsam_args(tmp_path), train_dataset=as_dataset(make_data(n=N))).train()
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.fc1.parameters()))
    assert not torch.equal(trainable_before, model.fc2.weight)


def test_logs_xsam_figures(tmp_path):
    trainer = XSAMTrainer(
        model=TinyClassifier(),
        args=xsam_args(tmp_path, rho=0.3, logging_steps=2),
        train_dataset=as_dataset(make_data(n=N)),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == STEPS // 2
    for entry in logs:
        for key in ("xsam/alpha", "xsam/theta", "xsam/ascent_loss", "xsam/sharpness"):
            assert math.isfinite(entry[key]), key
        assert 0.0 <= entry["xsam/alpha"] <= 2.0 and 0.0 < entry["xsam/theta"] < 180.0
        assert entry["xsam/sharpness"] == pytest.approx(entry["xsam/ascent_loss"] - entry["loss"], abs=1e-6)
        assert entry["xsam/nonfinite"] == 0


def test_resume_continues_as_if_never_interrupted(tmp_path):
    data = as_dataset(make_data(n=8))  # 2 steps per epoch: searches at steps 0, 2, 4; checkpoint at 3

    def train(output_dir, resume=None, max_steps=6):
        args = xsam_args(
            output_dir,
            rho=0.3,
            max_steps=max_steps,
            save_strategy="steps",
            save_steps=3,
            optim="adamw_torch",
            learning_rate=0.05,
            seed=7,
        )
        trainer = XSAMTrainer(model=TinyClassifier(seed=5), args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = train(tmp_path / "straight")
    train(tmp_path / "interrupted")
    checkpoint = tmp_path / "interrupted" / "checkpoint-3"
    saved_state = json.loads((checkpoint / XSAM_STATE_NAME).read_text())
    assert saved_state["last_search_step"] == 2
    resumed = train(tmp_path / "resumed", resume=str(checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))
    assert resumed.xsam.alpha == straight.xsam.alpha
    assert [s["step"] for s in resumed.xsam.search_history] == [s["step"] for s in straight.xsam.search_history]
    assert [s["step"] for s in straight.xsam.search_history] == [0, 2, 4]


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("sam_method", "adam", "Invalid sam_method: 'adam'; choose one of xsam, sam, none"),
        ("rho", -0.1, "Invalid rho: -0.1"),
        ("ascent_steps", 0, "Invalid ascent_steps: 0"),
        ("alpha_step", 0.0, "Invalid alpha_step: 0.0"),
        ("alpha_max", -1.0, "Invalid alpha_max"),
        ("sam_interval", 0, "Invalid sam_interval: 0"),
        ("alpha_search_interval", -1, "Invalid alpha_search_interval"),
        ("sam_perturbation", "half", "Invalid sam_perturbation: 'half'"),
        ("sam_eps", -1.0, "Invalid sam_eps"),
        ("sam_adaptive_eta", -0.5, "Invalid sam_adaptive_eta: -0.5"),
        ("sam_adaptive", "yes", "Invalid sam_adaptive: 'yes'"),
    ],
)
def test_invalid_arguments_fail_at_construction(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        XSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", **{field: value})


def test_trainer_refuses_plain_training_arguments(tmp_path):
    with pytest.raises(TypeError, match="needs XSAMTrainingArguments"):
        XSAMTrainer(model=TinyClassifier(), args=TrainingArguments(output_dir=str(tmp_path), report_to="none"))


def test_model_without_loss_is_refused(tmp_path):
    class NoLabels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)

        def forward(self, x):
            return {"logits": self.linear(x)}

    with pytest.raises(ValueError, match="XSAM needs a loss"):
        XSAMTrainer(model=NoLabels(), args=xsam_args(tmp_path))


@pytest.mark.parametrize(
    "engine, plugin, settings, match",
    [
        ("deepspeed", None, {}, "not supported with DeepSpeed.*Use FSDP"),
        ("fsdp", 1, {"sam_perturbation": "global"}, "FSDP2 only.*fsdp_version"),
        ("fsdp", 2, {}, "sam_perturbation='local' is not supported with FSDP.*--sam_perturbation global"),
        ("fsdp", 2, {"sam_perturbation": "global", "gradient_accumulation_steps": 2}, "sync_each_batch"),
    ],
)
def test_unsupported_distributed_engines_are_refused(tmp_path, monkeypatch, engine, plugin, settings, match):
    # neither DeepSpeed nor FSDP can be switched on on this CPU: put the trainer in their state by hand
    trainer = XSAMTrainer(model=TinyClassifier(), args=xsam_args(tmp_path, **settings))
    monkeypatch.setattr(trainer, f"is_{engine}_enabled", True)
    if plugin is not None:
        fsdp_plugin = type("Plugin", (), {"fsdp_version": plugin})
        monkeypatch.setattr(trainer.accelerator.state, "fsdp_plugin", fsdp_plugin, raising=False)
    with pytest.raises(ValueError, match=match):
        trainer._check_supported()


class RefModelFirst(Trainer):
    """A Trainer whose second parameter is not ``args``, as TRL's DPOTrainer (``model, ref_model, args, ...``)."""

    def __init__(self, model=None, ref_model=None, args=None, **kwargs):
        self.ref_model = ref_model
        super().__init__(model=model, args=args, **kwargs)


class XSAMRefModelFirst(XSAMTrainerMixin, RefModelFirst):
    pass


def test_the_mixin_finds_the_training_arguments_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = as_dataset(make_data())
    # model and ref_model positionally, no args: the XSAM defaults (a guess by position would pass none)
    trainer = XSAMRefModelFirst(TinyClassifier(), TinyClassifier(), train_dataset=data)
    assert isinstance(trainer.args, XSAMTrainingArguments) and trainer.args.output_dir == "trainer_output"
    args = training_args(tmp_path, rho=0.3)
    trainer = XSAMRefModelFirst(TinyClassifier(), None, args, train_dataset=data)  # args third, positionally
    assert trainer.args is args and trainer.ref_model is None
