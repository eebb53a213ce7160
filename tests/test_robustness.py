"""Nothing lost in real use: non-finite passes without a scaler, reruns, late gradients, tiny radii, devices."""

import copy
import logging

import pytest
import torch
from datasets import Dataset
from transformers import MarianConfig, MarianMTModel, Trainer, TrainerCallback

from helpers import (
    RoutedClassifier,
    SequentialXSAMTrainer,
    TinyClassifier,
    as_dataset,
    flat,
    flat_loss,
    make_data,
    moved,
    routed_data,
    training_args,
)
from hf_xsam import XSAM, XSAMSeq2SeqTrainer, XSAMSeq2SeqTrainingArguments, XSAMTrainer
from reference import xsam_direction

N, BATCH = 12, 4


def args_for(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=BATCH,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        rho=0.2,
        alpha_search_interval=0,
    )
    settings.update(overrides)
    return training_args(tmp_path, **settings)


class Snapshots(TrainerCallback):
    """Weights and optimizer state at the start and at the end of every optimizer step."""

    def __init__(self):
        self.begin, self.end = [], []

    @staticmethod
    def _take(model, optimizer):
        return flat(model), copy.deepcopy(optimizer.state_dict()["state"])

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin.append(self._take(model, optimizer))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.end.append(self._take(model, optimizer))


def same_state(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(x[name], y[name]) for key in a for x, y in [(a[key], b[key])] for name in x
    )


class InfInPass(SequentialXSAMTrainer):
    """Makes the loss infinite (or ``poison``) in pass ``bad_pass`` of optimizer step 1 (1 = first, 2 = the next: the
    ascent point with one ascent step, the first step's end with two)."""

    bad_pass = 2
    poison = float("inf")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.calls = getattr(self, "calls", 0) + 1
        passes = self.args.step_rule.passes(self.args.ascent_steps)
        if self.state.global_step == 1 and self.calls == passes + self.bad_pass:
            loss = loss * self.poison
        return loss


# ASAM's ascent and a NaN, in the first pass or the second of a climb of two steps: the norms ||T g|| of the climb
# must carry it to the skip
ADAPTIVE = dict(sam_adaptive=True, rho=1.0, ascent_steps=2)


@pytest.mark.parametrize(
    "optim, dtype, autocast, settings, poison",
    [
        ("adamw_torch_fused", torch.float32, False, {}, float("inf")),
        ("adamw_torch", torch.float32, False, {}, float("inf")),
        ("sgd", torch.float32, False, {}, float("inf")),
        ("adamw_torch_fused", torch.bfloat16, False, {}, float("inf")),
        ("sgd", torch.float32, True, {}, float("inf")),
        ("adamw_torch", torch.float32, False, ADAPTIVE, float("nan")),
    ],
)
@pytest.mark.parametrize("bad_pass", [1, 2])
def test_nonfinite_pass_without_scaler_skips_the_step(
    tmp_path, caplog, optim, dtype, autocast, settings, poison, bad_pass
):
    model, data = TinyClassifier(dtype=dtype), make_data(n=N)
    snapshots = Snapshots()
    trainer = InfInPass(
        model=model,
        args=args_for(tmp_path, max_steps=3, optim=optim, bf16=autocast, **settings),
        train_dataset=as_dataset(data),
        callbacks=[snapshots],
    )
    trainer.bad_pass, trainer.poison = bad_pass, poison
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer.train()
    (weights_before, state_before), (weights_after, state_after) = snapshots.begin[1], snapshots.end[1]
    assert torch.equal(weights_after, weights_before), "the non-finite step must leave the weights untouched"
    assert same_state(state_after, state_before), "and the optimizer state"
    assert not torch.equal(snapshots.end[2][0], weights_after), "training continues"
    assert torch.isfinite(flat(model)).all()
    assert [e["xsam/nonfinite"] for e in trainer.state.log_history if "xsam/nonfinite" in e] == [0, 1, 0]
    assert trainer.state.global_step == 3
    assert sum("non-finite gradient" in r.message for r in caplog.records) == 1


class InfOnStep1(SequentialXSAMTrainer):
    """Makes every loss of optimizer step 1 infinite."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        return loss * float("inf") if self.state.global_step == 1 else loss


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch", "sgd"])
@pytest.mark.parametrize(
    "schedule", [dict(sam_interval=2), dict(sam_start_ratio=0.5), dict(sam_interval=2, sam_reuse=True)]
)
def test_nonfinite_plain_step_of_a_cheap_schedule_is_skipped(tmp_path, caplog, optim, schedule):
    """Step 1 is a plain step (the Trainer's own pass): skipped as a sharpness-aware step would be, where the plain
    Trainer would step with a NaN gradient."""
    model, snapshots = TinyClassifier(dtype=torch.float32), Snapshots()
    args = args_for(tmp_path, max_steps=4, optim=optim, **schedule)
    trainer = InfOnStep1(model=model, args=args, train_dataset=as_dataset(make_data(n=N)), callbacks=[snapshots])
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer.train()
    assert not args.sharpness_aware_step(1, 4)
    (weights_before, state_before), (weights_after, state_after) = snapshots.begin[1], snapshots.end[1]
    assert torch.equal(weights_after, weights_before) and same_state(state_after, state_before)
    assert not torch.equal(snapshots.end[2][0], weights_after) and torch.isfinite(flat(model)).all()
    assert [e["xsam/nonfinite"] for e in trainer.state.log_history if "xsam/nonfinite" in e][:3] == [0, 1, 0]
    assert sum("plain step" in r.message and "non-finite" in r.message for r in caplog.records) == 1


def test_fused_skip_makes_no_host_sync(tmp_path, monkeypatch):
    """The guarded optimizer step reads no tensor back (the engine's own step is checked in test_engine)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in the optimizer step")

    class NoSyncInOptimizerStep(TrainerCallback):
        steps = 0

        def on_pre_optimizer_step(self, *args, **kwargs):
            for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
                monkeypatch.setattr(torch.Tensor, name, forbidden)

        def on_optimizer_step(self, *args, **kwargs):
            monkeypatch.undo()
            self.steps += 1

    check = NoSyncInOptimizerStep()
    args = args_for(tmp_path, max_steps=3, optim="adamw_torch_fused")
    trainer = InfInPass(
        model=TinyClassifier(dtype=torch.float32),
        args=args,
        train_dataset=as_dataset(make_data(n=N)),
        callbacks=[check],
    )
    trainer.train()
    assert check.steps == 3
    assert [e["xsam/nonfinite"] for e in trainer.state.log_history if "xsam/nonfinite" in e] == [0, 1, 0]


def test_model_init_runs_train_twice(tmp_path):
    data = as_dataset(make_data(n=N))
    trainer = XSAMTrainer(
        model_init=lambda: TinyClassifier(dtype=torch.float32),
        args=args_for(tmp_path, max_steps=2),
        train_dataset=data,
    )
    trainer.train()
    first = trainer.model
    trainer.train()
    assert trainer.model is not first
    assert all(p is q for p, q in zip(trainer.xsam.params, trainer.model.parameters()))


def test_second_train_starts_a_new_schedule_and_new_figures(tmp_path):
    data = as_dataset(make_data(n=N))
    # 3 steps an epoch, a log every 2: run 1 leaves one step unlogged
    args = args_for(tmp_path, max_steps=3, logging_steps=2, alpha_search_interval=None, optim="adamw_torch")
    trainer = XSAMTrainer(model=TinyClassifier(dtype=torch.float32), args=args, train_dataset=data)
    trainer.train()
    assert trainer.xsam.search_count == 1
    trainer.train()
    assert trainer.xsam.search_count == 1 and trainer.xsam.search_history[-1]["step"] == 0, "run 2 searches anew"
    first_log = next(e for e in trainer.state.log_history[::-1] if e.get("step") == 2 and "loss" in e)
    # the XSAM figures of a log cover the same steps as its loss
    assert first_log["xsam/ascent_loss"] - first_log["xsam/sharpness"] == pytest.approx(first_log["loss"], abs=1e-4)


class LateBranch(TinyClassifier):
    """A parameter reached only by the second pass of every step (as a branch used only at the ascent point)."""

    def __init__(self):
        super().__init__(dtype=torch.float32)
        self.late = torch.nn.Parameter(torch.zeros(3))
        self.calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        out = super().forward(x)
        if self.calls % 2 == 0:
            out["logits"] = out["logits"] + self.late
        out["loss"] = torch.nn.functional.cross_entropy(out["logits"], labels)
        return out


@pytest.mark.parametrize("accumulation", [1, 2])
def test_parameters_first_reached_after_the_first_pass_get_no_update(tmp_path, accumulation):
    model = LateBranch()
    trainer = XSAMTrainer(
        model=model,
        args=args_for(tmp_path, max_steps=2, gradient_accumulation_steps=accumulation, per_device_train_batch_size=2),
        train_dataset=as_dataset(make_data(n=N)),
    )
    before = flat(model)
    trainer.train()
    assert torch.equal(model.late.detach(), torch.zeros(3))
    assert not torch.equal(flat(model)[:-3], before[:-3]), "the others train"


class MovedAtEachStep(TrainerCallback):
    """The names of the parameters each optimizer step changed."""

    def __init__(self):
        self.moved = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {name: p.detach().clone() for name, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.moved.append(moved(self.before, model))


@pytest.mark.parametrize("settings", [dict(sam_method="sam"), dict(alpha=1.4)], ids=["sam", "xsam"])
def test_a_head_only_the_first_micro_batch_reached_moves_as_with_the_plain_trainer(tmp_path, settings):
    data = routed_data("aabb" * 3)  # every step: micro-batch 0 through head a, micro-batch 1 through head b
    runs = {}
    for name, method in {"none": dict(sam_method="none"), "sharpness_aware": settings}.items():
        model, steps = RoutedClassifier(), MovedAtEachStep()
        args = args_for(
            tmp_path / name, max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, **method
        )
        SequentialXSAMTrainer(model=model, args=args, train_dataset=as_dataset(data), callbacks=[steps]).train()
        runs[name] = model, steps.moved
    used = {name for name, _ in RoutedClassifier().named_parameters() if not name.startswith("spare")}
    assert runs["none"][1] == [used] * 3
    assert runs["sharpness_aware"][1] == runs["none"][1]
    # the float64 reference: per step the sum of both micro-batches' directions (loss scaled by 1/2), SGD
    reference, alpha = RoutedClassifier(), settings.get("alpha", 1.0)
    w = flat(reference)
    for step in range(3):
        micro = [{k: v[start : start + 2] for k, v in data.items()} for start in (4 * step, 4 * step + 2)]
        losses = [(lambda f: lambda v: 0.5 * f(v))(flat_loss(reference, batch)) for batch in micro]
        w = w - 0.1 * sum(xsam_direction(loss, w, rho=0.2, alpha=alpha)[0] for loss in losses)
    torch.testing.assert_close(flat(runs["sharpness_aware"][0]), w, rtol=1e-9, atol=1e-10)


class LayersWithGradient(TrainerCallback):
    """Per optimizer step, the decoder layers whose parameters hold a gradient when the optimizer steps."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        layers = model.model.decoder.layers
        graded = [[p.grad is not None for p in layer.parameters()] for layer in layers]
        assert all(all(g) or not any(g) for g in graded), "a layer is updated whole or not at all"
        self.steps.append({i for i, g in enumerate(graded) if all(g)})


@pytest.mark.parametrize("sam_method", ["none", "xsam"])
def test_marian_decoder_layerdrop_under_accumulation_updates_what_any_micro_batch_ran(tmp_path, sam_method):
    """A decoder layer that the pass of any micro-batch of the step ran (the first pass, with XSAM) is updated at
    that step, one that none ran is not: the plain Trainer's rule, which the "none" run confirms."""
    config = MarianConfig(
        vocab_size=20,
        d_model=8,
        encoder_layers=1,
        decoder_layers=3,
        decoder_layerdrop=0.5,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=8,
        decoder_ffn_dim=8,
        max_position_embeddings=16,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    tokens = torch.randint(1, 20, (24, 5), generator=torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(0)
    model = MarianMTModel(config)
    args = XSAMSeq2SeqTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=6,
        optim="sgd",
        learning_rate=0.1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        save_strategy="no",
        sam_method=sam_method,
        rho=0.05,
        seed=0,
    )
    layers = LayersWithGradient()
    trainer = XSAMSeq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"input_ids": tokens, "labels": tokens}),
        callbacks=[layers],
    )
    ran = []  # per micro-batch: the decoder layers its (first) pass ran
    decoder = model.model.decoder
    decoder.register_forward_pre_hook(lambda module, inputs: None if trainer._xsam_extra_pass else ran.append(set()))
    for index, layer in enumerate(decoder.layers):
        layer.register_forward_pre_hook(
            lambda module, inputs, index=index: None if trainer._xsam_extra_pass else ran[-1].add(index)
        )
    trainer.train()
    expected = [ran[2 * step] | ran[2 * step + 1] for step in range(6)]
    assert layers.steps == expected
    assert any(ran[2 * step] - ran[2 * step + 1] for step in range(6)), "a layer only the first micro-batch ran"
    assert any(len(layers) < 3 for layers in expected), "a layer no micro-batch ran"


def test_radius_below_float_resolution_falls_back_to_sam_and_keeps_training(tmp_path, caplog):
    data = make_data(n=N)
    xsam_model, plain_model = TinyClassifier(dtype=torch.float32), TinyClassifier(dtype=torch.float32)
    args = args_for(tmp_path, max_steps=3, rho=1e-12, alpha_search_interval=1, optim="sgd")
    trainer = XSAMTrainer(model=xsam_model, args=args, train_dataset=as_dataset(data))
    with caplog.at_level(logging.WARNING, logger="hf_xsam.trainer"):
        trainer.train()
    plain_args = args_for(tmp_path / "plain", max_steps=3, optim="sgd")
    Trainer(model=plain_model, args=plain_args, train_dataset=as_dataset(data)).train()
    # the ascent point is w0 itself, so SAM's direction is the plain gradient: the run is plain SGD
    torch.testing.assert_close(flat(xsam_model), flat(plain_model), rtol=1e-5, atol=1e-6)
    assert sum("did not move the weights" in r.message for r in caplog.records) == 1


def test_search_history_is_bounded_and_counted():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    engine = XSAM([w], rho=0.1, alpha_search_interval=1)

    def forward_backward():
        loss = (w**4).sum()
        loss.backward()
        return loss.detach()

    for step in range(70):
        w.grad = None
        engine.step(forward_backward, lambda: (w**4).sum(), step=step)
    assert engine.search_count == 70
    assert [s["step"] for s in engine.search_history] == list(range(6, 70))
    restored = XSAM([w], rho=0.1, alpha_search_interval=1)
    restored.load_state_dict(engine.state_dict())
    assert restored.search_count == 70 and list(restored.search_history) == list(engine.search_history)


def test_parameters_on_several_devices_are_refused():
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, device="meta"))]
    with pytest.raises(ValueError, match="one device, found them on cpu, meta.*FSDP2"):
        XSAM(params, rho=0.1)


def test_mixed_dtypes_step_and_restore_exactly():
    model = TinyClassifier(dtype=torch.float32)
    model.fc2.to(torch.bfloat16)
    model.forward = lambda x, labels=None: {
        "loss": torch.nn.functional.cross_entropy(
            model.fc2(torch.tanh(model.fc1(x.float())).bfloat16()).float(), labels
        )
    }
    batch = {k: v.float() if v.is_floating_point() else v for k, v in make_data().items()}
    before = [p.detach().clone() for p in model.parameters()]
    engine = XSAM(model.parameters(), rho=0.1)

    def forward_backward():
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    stats = engine.step(forward_backward, lambda: model(**batch)["loss"], step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not stats.nonfinite and not stats.stalled
