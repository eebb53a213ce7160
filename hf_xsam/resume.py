"""Loading a checkpoint's weights into the model being trained, through the model's own key conversion.

transformers 5 renames some checkpoint keys on load (ViT saves ``vit.encoder.layer.0.attention.attention.query``
for the module ``vit.layers.0.attention.q_proj``). ``Trainer._load_from_checkpoint`` loads the file with
``load_state_dict(strict=False)`` and so leaves such weights at their fresh initialisation, with only a warning.
Loading through ``from_pretrained`` applies the conversion; a checkpoint that still does not match is an error.

Example:
    >>> import tempfile, torch
    >>> from transformers import ViTConfig, ViTForImageClassification
    >>> from hf_xsam.resume import load_model_weights
    >>> config = ViTConfig(image_size=8, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
    ...                    intermediate_size=8, num_labels=2)
    >>> trained, fresh = ViTForImageClassification(config), ViTForImageClassification(config)
    >>> folder = tempfile.mkdtemp()
    >>> trained.save_pretrained(folder)
    >>> load_model_weights(fresh, folder)
    >>> all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), fresh.state_dict().values()))
    True
"""

from __future__ import annotations

import os

import torch
from transformers import PreTrainedModel
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from .state import ResumeError

__all__ = ["ResumeError", "has_full_weights", "load_model_weights"]

_PROBLEMS = ("missing_keys", "unexpected_keys", "mismatched_keys")


def has_full_weights(folder: str) -> bool:
    """Whether ``folder`` holds a whole model's weights as ``save_pretrained`` writes them."""
    names = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
    return any(os.path.isfile(os.path.join(folder, name)) for name in names)


@torch.no_grad()
def load_model_weights(model: PreTrainedModel, folder: str) -> None:
    """Copy the weights saved in ``folder`` into ``model`` in place, every tensor or an error.

    The checkpoint is read with ``type(model).from_pretrained`` (on the CPU, with the model's config), so the
    keys go through the model's conversion mapping, then copied with ``load_state_dict(strict=True)``. This
    holds a second copy of the weights on the CPU while it runs.

    Raises:
        ResumeError: (a ``ValueError``) the checkpoint does not load into this model, or leaves tensors missing or
            unused.
    """
    name = type(model).__name__
    try:
        loaded, info = type(model).from_pretrained(folder, config=model.config, output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as error:
        raise ResumeError(f"Cannot resume from {folder}: its weights do not load into {name}: {error}") from error
    problems = {kind: sorted(info.get(kind) or ()) for kind in _PROBLEMS if info.get(kind)}
    if problems:
        details = "; ".join(
            f"{kind.replace('_', ' ')}: {', '.join(map(str, keys[:5]))}"
            + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            for kind, keys in problems.items()
        )
        raise ResumeError(f"Cannot resume from {folder}: the checkpoint does not match {name} ({details})")
    model.load_state_dict(loaded.state_dict(), strict=True)
