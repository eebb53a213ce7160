"""Real transformers models, built from tiny configs, train with XSAM and AdamW."""

import copy

import torch
from datasets import Dataset
from transformers import (
    MarianConfig,
    MarianMTModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

from helpers import training_args
from hf_xsam import XSAMSeq2SeqTrainer, XSAMSeq2SeqTrainingArguments, XSAMTrainer

COMMON = dict(
    logging_steps=5,
    optim="adamw_torch",
    learning_rate=1e-2,
    lr_scheduler_type="constant",
    rho=0.05,
    seed=0,
)


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_tiny_vit_learns(tmp_path):
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)
    images = torch.randn(64, 1, 8, 8, generator=generator) * 0.3
    images[labels == 1, :, :4] += 1.0  # class 1 is bright in the top half
    data = Dataset.from_dict({"pixel_values": images.tolist(), "labels": labels.tolist()}).with_format("torch")
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
    )
    args = training_args(tmp_path, per_device_train_batch_size=16, max_steps=30, **COMMON)
    torch.manual_seed(0)  # the initial weights, whatever ran before
    trainer = XSAMTrainer(model=ViTForImageClassification(config), args=args, train_dataset=data)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < 0.5 * history[0], history


def test_tiny_marian_learns_to_copy(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 9, (64, 4), generator=generator)
    eos = torch.full((64, 1), 2)
    sequences = torch.cat([tokens, eos], dim=1).tolist()
    data = Dataset.from_dict({"input_ids": sequences, "labels": sequences}).with_format("torch")
    config = MarianConfig(
        vocab_size=20,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=16,
        pad_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=0,
        forced_eos_token_id=2,
    )
    args = training_args(
        tmp_path, XSAMSeq2SeqTrainingArguments, per_device_train_batch_size=16, max_steps=40, ascent_steps=2, **COMMON
    )
    torch.manual_seed(0)
    trainer = XSAMSeq2SeqTrainer(model=MarianMTModel(config), args=args, train_dataset=data)
    trainer.train()
    history = losses(trainer)
    assert history[-1] < 0.6 * history[0], history
    assert trainer.xsam.search_history, "the alpha search ran"


def test_tiny_resnet_trains_with_sgd_and_batchnorm_sees_the_first_pass_only(tmp_path):
    """The paper's setting in small: a ResNet with BatchNorm, SGD with momentum, the alpha search on."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (16,), generator=generator)
    images = torch.randn(16, 3, 16, 16, generator=generator)
    images[labels == 1, :, :8] += 1.0
    data = Dataset.from_dict({"pixel_values": images.tolist(), "labels": labels.tolist()}).with_format("torch")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2)
    torch.manual_seed(0)
    model = ResNetForImageClassification(config)
    # the expectation: the statistics after one plain training-mode forward pass over the step's batch
    plain = copy.deepcopy(model).train()
    with torch.no_grad():
        plain(pixel_values=images)
    settings = {**COMMON, "optim": "sgd", "optim_args": "momentum=0.9", "learning_rate": 0.05}
    args = training_args(tmp_path, per_device_train_batch_size=16, max_steps=1, **settings)
    trainer = XSAMTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    # with SGD the default grid ends at alpha 1: 11 points
    assert len(trainer.xsam.search_history[0]["losses"]) == 11, "the search ran on the step"
    for name, buffer in plain.named_buffers():
        # the ascent pass and 11 search passes would each have moved them (and num_batches_tracked to 13)
        torch.testing.assert_close(model.get_buffer(name), buffer, rtol=1e-5, atol=1e-6, msg=name)
    trained = dict(model.named_parameters())
    assert any(not torch.equal(p, trained[n]) for n, p in plain.named_parameters()), "the step moved the weights"
