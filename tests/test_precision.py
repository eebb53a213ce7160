"""Loss scaling (fp16's GradScaler, on CPU), bf16 weights, torch.compile and LoRA adapters."""

import math

import pytest
import torch
from transformers import TrainerCallback

from helpers import SequentialXSAMTrainer, TinyClassifier, as_dataset, flat, flat_loss, make_data, training_args
from hf_xsam import XSAM, XSAMTrainer
from reference import xsam_direction

N, BATCH, LR = 12, 4, 0.5


def args_for(tmp_path, **overrides):
    settings = dict(
        # the paper's rule, which tests/reference.py implements (grid 0..2 with SGD too)
        extrapolate_after_drop=0.0,
        alpha_max=2.0,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        rho=0.2,
        alpha=1.3,
        alpha_search_interval=0,
    )
    settings.update(overrides)
    return training_args(tmp_path, **settings)


class WeightsAfterEachStep(TrainerCallback):
    def __init__(self):
        self.weights = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(flat(model))


class InfInAscentPass(SequentialXSAMTrainer):
    """Makes the loss infinite in the pass at the ascent point of the optimizer step ``bad_step``."""

    bad_step = 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.calls = getattr(self, "calls", 0) + 1
        if self.state.global_step == self.bad_step and self.calls == 2 * self.bad_step + 2:
            loss = loss * float("inf")
        return loss


def with_cpu_grad_scaler(trainer, init_scale=2.0**10):
    # the Trainer makes no GradScaler on CPU; the accelerator hands this one to the optimizer it prepares
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    return trainer.accelerator.scaler


def test_loss_scaling_keeps_the_step_exact(tmp_path):
    model, data = TinyClassifier(), make_data(n=N)
    batch = {k: v[:BATCH] for k, v in data.items()}
    expected = flat(model) - LR * xsam_direction(flat_loss(model, batch), flat(model), rho=0.2, alpha=1.3)[0]
    trainer = SequentialXSAMTrainer(model=model, args=args_for(tmp_path, max_steps=1), train_dataset=as_dataset(data))
    with_cpu_grad_scaler(trainer)
    trainer.train()
    torch.testing.assert_close(flat(model), expected, rtol=1e-9, atol=1e-10)


def test_nonfinite_ascent_gradient_skips_the_step_and_training_continues(tmp_path):
    model, data = TinyClassifier(), make_data(n=N)
    weights = WeightsAfterEachStep()
    trainer = InfInAscentPass(
        model=model, args=args_for(tmp_path, max_steps=3), train_dataset=as_dataset(data), callbacks=[weights]
    )
    scaler = with_cpu_grad_scaler(trainer)
    trainer.train()
    assert torch.equal(weights.weights[1], weights.weights[0]), "the bad step must leave the weights untouched"
    assert not torch.equal(weights.weights[2], weights.weights[1]), "training continues after it"
    assert all(torch.isfinite(w).all() for w in weights.weights)
    assert scaler.get_scale() == 2.0**9, "the scaler lowers its scale once"
    nonfinite = [entry["xsam/nonfinite"] for entry in trainer.state.log_history if "xsam/nonfinite" in entry]
    assert nonfinite == [0, 1, 0]
    assert trainer.xsam.alpha == 1.3


def test_bf16_weights_are_restored_bit_for_bit():
    model = TinyClassifier(dtype=torch.bfloat16)
    batch = make_data()
    before = [p.detach().clone() for p in model.parameters()]

    def forward_backward():
        loss = model(**batch)["loss"]
        loss.backward()
        return loss.detach()

    engine = XSAM(model.parameters(), rho=0.05, ascent_steps=2)
    engine.step(forward_backward, lambda: model(**batch)["loss"], step=0)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_bf16_model_trains(tmp_path):
    model = TinyClassifier(dtype=torch.bfloat16)
    trainer = XSAMTrainer(
        model=model,
        args=args_for(tmp_path, max_steps=4, alpha_search_interval=None),
        train_dataset=as_dataset(make_data(n=N)),
    )
    trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(math.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)


def test_torch_compile_matches_reference(tmp_path):
    model, data = TinyClassifier(dtype=torch.float32), make_data(n=N)
    batch = {k: v[:BATCH] for k, v in data.items()}
    expected = flat(model) - LR * xsam_direction(flat_loss(model, batch), flat(model), rho=0.2, alpha=1.3)[0]
    args = args_for(tmp_path, max_steps=1, torch_compile=True, torch_compile_backend="aot_eager")
    SequentialXSAMTrainer(model=model, args=args, train_dataset=as_dataset(data)).train()
    torch.testing.assert_close(flat(model), expected, rtol=1e-4, atol=1e-5)


def test_lora_adapters_only_move(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    torch.manual_seed(0)
    base = BertForSequenceClassification(config)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(1, 30, (16, 5), generator=torch.Generator().manual_seed(0))
    from datasets import Dataset

    data = Dataset.from_dict({"input_ids": tokens.tolist(), "labels": (tokens[:, 0] > 15).long().tolist()})
    args = args_for(tmp_path, max_steps=3, optim="adamw_torch", learning_rate=1e-2, alpha_search_interval=None)
    trainer = XSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert any("lora_" in n for n in moved)
    assert len(trainer.xsam.params) == len(trainable)


def test_bf16_autocast_step_is_close_to_fp32(tmp_path):
    model, data = TinyClassifier(dtype=torch.float32), make_data(n=N)
    batch = {k: v[:BATCH] for k, v in data.items()}
    expected = flat(model) - LR * xsam_direction(flat_loss(model, batch), flat(model), rho=0.2, alpha=1.3)[0]
    args = args_for(tmp_path, max_steps=1, bf16=True)
    trainer = SequentialXSAMTrainer(model=model, args=args, train_dataset=as_dataset(data))
    trainer.train()
    assert next(model.parameters()).dtype == torch.float32
    # bf16 keeps ~3 significant digits in the forward pass: close to fp32, but visibly not fp32
    error = float((flat(model) - expected).abs().max())
    assert 1e-6 < error < 1e-2
