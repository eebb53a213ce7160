"""Symmetric label noise for the training split of a classification dataset."""

from __future__ import annotations

import numpy as np
from datasets import Dataset

__all__ = ["add_label_noise"]


def add_label_noise(dataset: Dataset, label_column: str, fraction: float, seed: int) -> Dataset:
    """``dataset`` with exactly ``round(fraction * len(dataset))`` labels, chosen by ``seed``, each replaced by a
    uniformly drawn *other* class (symmetric noise).

    Args:
        dataset: a split whose ``label_column`` is a ``ClassLabel`` with at least two classes.
        label_column: the column of class indices.
        fraction: the share of labels to change, in [0, 1).
        seed: fixes which labels change and to what.

    Example:
        >>> from datasets import ClassLabel, Dataset, Features
        >>> data = Dataset.from_dict({"label": [0, 1, 2, 0]}, features=Features({"label": ClassLabel(num_classes=3)}))
        >>> noisy = add_label_noise(data, "label", 0.5, seed=0)["label"]
        >>> sum(a != b for a, b in zip(noisy, data["label"]))
        2
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"Invalid label_noise: {fraction}; it must be in [0, 1)")
    feature = dataset.features[label_column]
    labels = np.array(dataset[label_column])
    rng = np.random.default_rng(seed)
    changed = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    # a shift of 1..C-1 classes lands uniformly on one of the other C-1 classes
    labels[changed] = (labels[changed] + rng.integers(1, feature.num_classes, size=len(changed))) % feature.num_classes
    return dataset.map(
        lambda _, indices: {label_column: labels[indices].tolist()},
        input_columns=[label_column],
        with_indices=True,
        batched=True,
        features=dataset.features,
        load_from_cache_file=False,
    )
