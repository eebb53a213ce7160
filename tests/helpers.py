"""Small models, data and adapters shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from hf_xsam import XSAMTrainer, XSAMTrainingArguments

# a tiny ViT for the image-classification script's runs
TINY_VIT = [
    "--image_size",
    "8",
    "--patch_size",
    "4",
    "--hidden_size",
    "16",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "32",
]


def training_args(tmp_path, args_class=XSAMTrainingArguments, **settings):
    """``args_class`` for a quiet one-process CPU run writing into ``tmp_path``: no reports, no progress bar, a log
    every step and no checkpoints, unless ``settings`` (which win) say otherwise."""
    quiet = dict(report_to="none", disable_tqdm=True, use_cpu=True, logging_steps=1, save_strategy="no")
    return args_class(**{"output_dir": str(tmp_path), **quiet, **settings})


class TinyClassifier(nn.Module):
    """A two-layer classifier with the Trainer's conventions (``labels`` in, ``loss`` out)."""

    def __init__(
        self,
        n_in: int = 4,
        hidden: int = 6,
        n_out: int = 3,
        dropout: float = 0.0,
        batchnorm: bool = False,
        bn_momentum: float | None = 0.1,
        dtype=torch.float64,
        seed: int = 0,
    ):
        super().__init__()
        self.config = PretrainedConfig()  # the Trainer reads it for label smoothing
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(n_in, hidden, dtype=dtype)
        self.norm = nn.BatchNorm1d(hidden, momentum=bn_momentum, dtype=dtype) if batchnorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_out, dtype=dtype)

    def forward(self, x, labels=None):
        h = self.dropout(torch.tanh(self.norm(self.fc1(x.to(self.fc1.weight.dtype)))))
        logits = self.fc2(h)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class RoutedClassifier(nn.Module):
    """Examples with ``x[:, 0] > 0`` go through head ``a``, the others through head ``b`` (of another size); ``spare``
    is never used. A batch all on one side leaves the other head without a gradient, as LayerDrop, multi-task heads
    and conditional branches do."""

    def __init__(self, dtype=torch.float64, seed: int = 0):
        super().__init__()
        self.config = PretrainedConfig()
        torch.manual_seed(seed)
        self.body = nn.Linear(4, 6, dtype=dtype)
        self.a = nn.Linear(6, 3, dtype=dtype)
        self.b = nn.Sequential(nn.Linear(6, 5, dtype=dtype), nn.Tanh(), nn.Linear(5, 3, dtype=dtype))
        self.spare = nn.Linear(6, 3, dtype=dtype)

    def forward(self, x, labels=None):
        h = torch.tanh(self.body(x.to(self.body.weight.dtype)))
        to_a = x[:, 0] > 0
        logits = h.new_zeros(len(x), 3)
        if to_a.any():
            logits[to_a] = self.a(h[to_a])
        if not to_a.all():
            logits[~to_a] = self.b(h[~to_a])
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def routed_data(heads: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """One example per character of ``heads`` ("a" or "b"): the head :class:`RoutedClassifier` sends it to."""
    data = make_data(n=len(heads), seed=seed)
    sign = torch.tensor([1.0 if head == "a" else -1.0 for head in heads], dtype=data["x"].dtype)
    # float32 values, as make_data's
    data["x"][:, 0] = (sign * (data["x"][:, 0].abs() + 0.1)).float().double()
    return data


def moved(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    """The names of the parameters of ``model`` that differ from ``before``."""
    return {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}


def make_data(n: int = 16, n_in: int = 4, n_out: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    # float32 values, so that the Trainer's collator (float32) and the float64 reference see the same data
    x = torch.randn(n, n_in, generator=generator).double()
    labels = torch.randint(0, n_out, (n,), generator=generator)
    return {"x": x, "labels": labels}


def as_dataset(data: dict[str, torch.Tensor]) -> Dataset:
    return Dataset.from_dict({"x": data["x"].tolist(), "labels": data["labels"].tolist()})


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)]).double()


def flat_loss(model: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0):
    """The model's loss on ``batch`` as a function of its trainable parameters flattened into one vector."""
    model = copy.deepcopy(model).double()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in trainable(model)]

    def loss(w: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(w, [s.numel() for s in shapes])
        params = {name: c.reshape(s) for name, c, s in zip(names, chunks, shapes)}
        logits = torch.func.functional_call(model, params, (batch["x"],))["logits"]
        return F.cross_entropy(logits, batch["labels"], label_smoothing=label_smoothing)

    return loss


class SequentialXSAMTrainer(XSAMTrainer):
    """Feeds batches in dataset order, so that a reference loop can follow the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def tiny_llama(tokenizer, seed: int = 0, max_positions: int = 64) -> LlamaForCausalLM:
    """A one-layer Llama of hidden size 16 over ``tokenizer``'s vocabulary, built from a config (SFT and DPO tests)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)
