"""Small models, data and adapters shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import nn
from torch.utils.data import SequentialSampler
from transformers import PretrainedConfig

from hf_xsam import XSAMTrainer

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
