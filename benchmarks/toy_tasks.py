"""Two offline toy tasks for the benchmark and the diagnostics: a tiny ViT on sklearn's 8x8 digits and a
small Marian translating English number words to French (made with num2words). Models come from configs,
nothing is downloaded.

Example:
    >>> from toy_tasks import build_task
    >>> task = build_task("vit", "small", seed=0)
    >>> batch = task.batch(16)
    >>> float(task.model(**batch).loss) > 0
    True

Produces: no table of its own: the tasks and models that benchmark.py, direction_quality.py, diagnostics.py and search_agreement.py share.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import MarianConfig, MarianMTModel, ViTConfig, ViTForImageClassification

__all__ = ["Task", "build_task", "TASKS", "SIZES"]

TASKS = ("vit", "marian")
SIZES = ("small", "large")
PAD, EOS = 0, 1


@dataclass
class Task:
    """A model and its training examples (a list of dicts of tensors, one example each)."""

    name: str
    size: str
    model: nn.Module
    train: list[dict[str, Tensor]]
    test: list[dict[str, Tensor]]

    def collate(self, examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Stack (and for text, pad) examples into a batch; labels are padded with -100."""
        batch = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if values[0].dim() == 0 or len({v.shape for v in values}) == 1:
                batch[key] = torch.stack(values)
            else:
                pad = -100 if key == "labels" else PAD
                batch[key] = nn.utils.rnn.pad_sequence(values, batch_first=True, padding_value=pad)
        if "input_ids" in batch:
            batch["attention_mask"] = (batch["input_ids"] != PAD).long()
        return batch

    def batch(self, size: int, offset: int = 0, split: str = "train") -> dict[str, Tensor]:
        """The ``size`` examples of ``split`` starting at ``offset`` (wrapping around), as a batch."""
        data = self.train if split == "train" else self.test
        return self.collate([data[(offset + i) % len(data)] for i in range(size)])


def _digits(image_size: int, seed: int) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    if image_size != 8:
        pixels = nn.functional.interpolate(pixels, size=image_size, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    examples = [{"pixel_values": pixels[i], "labels": labels[i]} for i in order]
    return examples[:1500], examples[1500:]


def _vit(size: str) -> ViTForImageClassification:
    small = size == "small"
    config = ViTConfig(
        image_size=8 if small else 16,
        patch_size=2 if small else 4,
        num_channels=1,
        hidden_size=64 if small else 256,
        num_hidden_layers=2 if small else 6,
        num_attention_heads=4 if small else 8,
        intermediate_size=128 if small else 1024,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _numbers(seed: int) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]], int]:
    from num2words import num2words

    numbers = random.Random(seed).sample(range(10_000), 3_000)
    pairs = [(_words(num2words(n, lang="en")), _words(num2words(n, lang="fr"))) for n in numbers]
    vocabulary = sorted({w for en, fr in pairs for w in en + fr})
    ids = {w: i + 2 for i, w in enumerate(vocabulary)}  # 0 = pad (also the decoder start), 1 = eos

    def encode(words: list[str]) -> Tensor:
        return torch.tensor([ids[w] for w in words] + [EOS])

    examples = [{"input_ids": encode(en), "labels": encode(fr)} for en, fr in pairs]
    return examples[:2500], examples[2500:], len(vocabulary) + 2


def _marian(size: str, vocab_size: int) -> MarianMTModel:
    small = size == "small"
    width = 64 if small else 256
    config = MarianConfig(
        vocab_size=vocab_size,
        d_model=width,
        encoder_layers=2 if small else 6,
        decoder_layers=2 if small else 6,
        encoder_attention_heads=4 if small else 8,
        decoder_attention_heads=4 if small else 8,
        encoder_ffn_dim=2 * width if small else 4 * width,
        decoder_ffn_dim=2 * width if small else 4 * width,
        max_position_embeddings=64,
        dropout=0.1,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=EOS,
    )
    return MarianMTModel(config)


def build_task(name: str, size: str = "small", seed: int = 0) -> Task:
    """The task ``name`` ("vit" or "marian") with a freshly initialised model of ``size`` ("small" or "large")."""
    if name not in TASKS or size not in SIZES:
        raise ValueError(f"Invalid task {name!r} / size {size!r}; choose from {TASKS} and {SIZES}")
    torch.manual_seed(seed)
    if name == "vit":
        train, test = _digits(8 if size == "small" else 16, seed)
        model = _vit(size)
    else:
        train, test, vocab_size = _numbers(seed)
        model = _marian(size, vocab_size)
    return Task(name, size, model, train, test)
