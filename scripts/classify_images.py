#!/usr/bin/env python
"""Train or fine-tune an image classifier (ViT) with XSAM: the ``run_image_classification.py`` of hf_xsam.

Fine-tune a checkpoint (``--model_name_or_path``, with ``--ignore_mismatched_sizes`` for a new label set) or
train a ViT built from a config (no ``--model_name_or_path``; sizes as flags), on a Hub dataset, image folders
(``--train_dir``/``--validation_dir``) or local parquet/JSON files in the Hub's layout. Images go through the
model's image processor; training images are first randomly cropped and flipped with Pillow (no torchvision).
Accuracy is reported.

With no data or model flags it runs offline: scikit-learn's bundled 8x8 digits images, a small ViT built from
a ViTConfig, trained with XSAM, accuracy on 300 held-out digits.

Examples:
    python scripts/classify_images.py
    accelerate launch scripts/classify_images.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name beans --do_train --do_eval --output_dir vit-beans-xsam --learning_rate 2e-5 \\
        --num_train_epochs 5 --per_device_train_batch_size 32 --rho 0.05
    python scripts/classify_images.py --sam_method none  # the AdamW baseline of the embedded run
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, load_dataset
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image as PILImage
from PIL import ImageOps
from transformers import (
    MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    ResNetConfig,
    ResNetForImageClassification,
    TrainerCallback,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from _common import (
    OutputDirArguments,
    UsageError,
    build_trainer,
    built_from_config,
    card_about,
    dataset_identity,
    finish,
    from_hub,
    load_data,
    record_metrics,
    run,
    start,
    train_and_save,
)
from hf_xsam import XSAMTrainer, XSAMTrainingArguments
from label_noise import add_label_noise

logger = logging.getLogger(__name__)

# without any of these options the script runs on its embedded data and model, with EMBEDDED_DEFAULTS
DATA_OPTIONS = {"dataset_name", "train_dir", "validation_dir", "train_file", "validation_file", "test_file"}
DATA_AND_MODEL_OPTIONS = DATA_OPTIONS | {"model_name_or_path"}
RUN_FLAGS = ("do_train", "do_eval", "do_predict")
ARCHITECTURES = ("vit", "resnet")
EMBEDDED_DATASET = "scikit-learn digits (8x8)"
EMBEDDED_DATASET_TYPE = "sklearn-digits"  # not a Hub dataset: the model-index needs a type, this one names the source
EMBEDDED_DEFAULTS = {
    "output_dir": "xsam-vit-digits",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.05,
    "num_train_epochs": 30,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "logging_steps": 50,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "rho": 0.05,
    "image_size": 16,
    "min_crop_scale": 0.7,
    "horizontal_flip": False,
}


@dataclass
class ModelArguments:
    """What to fine-tune, or which ViT or ResNet to build from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune (Hub id or local folder). Leave empty to train a ViT from scratch."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor (Hub id or folder) if not the one of --model_name_or_path."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose classifier has another number of labels (with a new head)."},
    )
    architecture: str = field(
        default="vit",
        metadata={
            "help": "From scratch: 'vit' (a ViT, sizes below) or 'resnet' (a ResNet with BatchNorm, basic blocks, "
            "sizes --resnet_embedding_size/--resnet_hidden_sizes/--resnet_depths).",
            "choices": list(ARCHITECTURES),
        },
    )
    image_size: int = field(default=32, metadata={"help": "From scratch: input resolution."})
    patch_size: int = field(default=4, metadata={"help": "From scratch: patch size."})
    hidden_size: int = field(default=64, metadata={"help": "From scratch: hidden size."})
    num_hidden_layers: int = field(default=4, metadata={"help": "From scratch: transformer layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    intermediate_size: int = field(default=128, metadata={"help": "From scratch: feed-forward size."})
    dropout: float = field(default=0.1, metadata={"help": "From scratch: dropout probability (ViT)."})
    resnet_embedding_size: int = field(default=16, metadata={"help": "From scratch, ResNet: channels of the stem."})
    resnet_hidden_sizes: list[int] = field(
        default_factory=lambda: [16, 32, 64], metadata={"help": "From scratch, ResNet: channels of each stage."}
    )
    resnet_depths: list[int] = field(
        default_factory=lambda: [1, 1, 1], metadata={"help": "From scratch, ResNet: basic blocks in each stage."}
    )

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"Invalid architecture: {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if len(self.resnet_hidden_sizes) != len(self.resnet_depths):
            raise ValueError(
                f"Invalid resnet_depths: {self.resnet_depths}; give one depth per stage of resnet_hidden_sizes "
                f"{self.resnet_hidden_sizes}"
            )


@dataclass
class DataTrainingArguments:
    """What images to train and evaluate on, and how to augment them."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub (datasets library)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Validation images, one folder per class."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: parquet or JSON lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data: parquet or JSON lines."})
    test_file: str | None = field(
        default=None,
        metadata={"help": "Test data for --do_predict (accuracy once, after training): parquet or JSON lines."},
    )
    image_column_name: str = field(default="image", metadata={"help": "Column holding the images (or their paths)."})
    label_column_name: str = field(default="label", metadata={"help": "Column holding the labels."})
    train_val_split: float = field(
        default=0.15, metadata={"help": "Fraction of the training data held out when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation images."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test images."})
    min_crop_scale: float = field(
        default=0.08,
        metadata={"help": "Random resized crop of training images: smallest area kept (1 turns it off)."},
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training images left-right at random."})
    label_noise: float = field(
        default=0.0,
        metadata={"help": "Fraction of training labels replaced by another class drawn uniformly (symmetric noise)."},
    )
    label_noise_seed: int = field(default=0, metadata={"help": "Fixes which training labels --label_noise changes."})
    eval_train_samples: int = field(
        default=0,
        metadata={
            "help": "During training, also evaluate on this many training images as trained on (noisy labels, no "
            "augmentation): eval_train_accuracy beside eval_validation_accuracy in the logs."
        },
    )

    def __post_init__(self) -> None:
        files = self.train_file or self.validation_file or self.test_file
        sources = [self.dataset_name, self.train_dir or self.validation_dir, files]
        if sum(source is not None for source in sources) > 1:
            raise ValueError(
                "Give one data source: --dataset_name, --train_dir/--validation_dir or "
                "--train_file/--validation_file/--test_file"
            )
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("parquet", "json", "jsonl"):
                raise ValueError(f"--{name} must be a parquet or JSON lines file, got {path!r}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"Invalid min_crop_scale: {self.min_crop_scale}; it must be in (0, 1]")
        if not 0 <= self.label_noise < 1:
            raise ValueError(f"Invalid label_noise: {self.label_noise}; it must be in [0, 1)")

    @property
    def embedded(self) -> bool:
        return not any(getattr(self, name) for name in DATA_OPTIONS)


def digits_dataset(num_eval: int = 300, seed: int = 0) -> DatasetDict:
    """scikit-learn's 1797 bundled 8x8 digits as grayscale images, with a stratified held-out split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [PILImage.fromarray((image * 255 / 16).round().astype(np.uint8)) for image in digits.images]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    data = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    split = data.train_test_split(test_size=num_eval, seed=seed, stratify_by_column="label")
    return DatasetDict(train=split["train"], validation=split["test"])


def raw_images(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> DatasetDict:
    """The raw splits, from the embedded digits, the Hub, image folders or files."""
    if data_args.embedded:
        return digits_dataset(seed=seed)
    if data_args.train_dir or data_args.validation_dir:
        folders = {"train": data_args.train_dir, "validation": data_args.validation_dir}
        files = {split: image_files(split, folder) for split, folder in folders.items() if folder}
        return load_dataset("imagefolder", data_files=files, cache_dir=model_args.cache_dir)
    files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
    return load_data(
        data_args.dataset_name, data_args.dataset_config_name, files, model_args.cache_dir, model_args.token
    )


def image_files(split: str, folder: str) -> str:
    """The glob of ``folder``'s images for the ``imagefolder`` loader, once the folder is found to hold some."""
    flag = "--train_dir" if split == "train" else "--validation_dir"
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder!r} is not a folder")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    if not any(os.path.splitext(name)[1].lower() in extensions for _, _, names in os.walk(folder) for name in names):
        raise UsageError(
            f"{flag} {folder!r} holds no images: it must hold one subfolder per class with image files (.png, .jpg, "
            "...) in them"
        )
    return os.path.join(folder, "**")


def check_columns(dataset: DatasetDict, data_args: DataTrainingArguments) -> DatasetDict:
    """Check the image and label columns; image paths become images and raw labels become class labels."""
    some_split = next(iter(dataset.values()))
    columns = some_split.column_names
    for flag in ("image_column_name", "label_column_name"):
        column = getattr(data_args, flag)
        if column not in columns:
            raise UsageError(
                f"--{flag} {column!r} is not a column of the dataset; found columns: {', '.join(columns)}"
            )
    image_column = data_args.image_column_name
    feature = some_split.features[image_column]
    if not isinstance(feature, Image):
        first = some_split[0][image_column]
        if not (getattr(feature, "dtype", None) == "string" or (isinstance(first, dict) and "bytes" in first)):
            raise UsageError(
                f"--image_column_name {image_column!r} holds {feature}, not images (first value: {first!r:.80}); "
                f"found columns: {', '.join(columns)}"
            )
        dataset = dataset.cast_column(image_column, Image())
        try:
            dataset[next(iter(dataset))][0][image_column]
        except Exception as err:
            raise UsageError(
                f"--image_column_name {image_column!r} holds {first!r:.80}, which is not an image ({err})"
            ) from err
    if not isinstance(some_split.features[data_args.label_column_name], ClassLabel):
        dataset = dataset.class_encode_column(data_args.label_column_name)
    return dataset


def random_resized_crop(image: PILImage.Image, min_scale: float, rng: random.Random) -> PILImage.Image:
    """A random crop of ``min_scale`` to all of the area, aspect ratio 3/4 to 4/3, resized back to the image size."""
    width, height = image.size
    area = width * height * rng.uniform(min_scale, 1.0)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    crop_w = min(width, np.sqrt(area * ratio))
    crop_h = min(height, np.sqrt(area / ratio))
    left, top = rng.uniform(0, width - crop_w), rng.uniform(0, height - crop_h)
    return image.resize(image.size, PILImage.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))


class EpochSeededImages(torch.utils.data.Dataset):
    """Training images through ``transform(rows, rngs)``, each drawing its augmentation from a generator of its own,
    seeded by (seed, epoch, index).

    A run resumed from a checkpoint then crops and flips every image as the uninterrupted run does. Python's global
    ``random`` would not, with this Trainer or the plain one: the dataloader fetches (and augments) the batch after
    the checkpoint before the checkpoint saves the random state, and on resume the Trainer restores that state only
    after fetching that batch, so the batch draws from the freshly seeded state instead. :class:`FollowEpoch` keeps
    ``epoch`` current.
    """

    def __init__(self, dataset: Dataset, transform: Callable[..., dict[str, Any]], seed: int):
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        rngs = [random.Random(f"{self.seed}/{self.epoch}/{index}") for index in indices]
        batch = self.transform(self.dataset[indices], rngs)
        return [dict(zip(batch, values)) for values in zip(*batch.values())]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]


class FollowEpoch(TrainerCallback):
    """Tells :class:`EpochSeededImages` the epoch that starts (also the one a resumed run starts in)."""

    def __init__(self, images: EpochSeededImages):
        self.images = images

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.images.epoch = int(state.epoch or 0)


def model_from_config(model_args: ModelArguments, id2label: dict[int, str]) -> torch.nn.Module:
    """A new ViT or ResNet (``--architecture``) of the sizes in ``model_args``; nothing is downloaded."""
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.architecture == "resnet":
        config = ResNetConfig(
            embedding_size=model_args.resnet_embedding_size,
            hidden_sizes=model_args.resnet_hidden_sizes,
            depths=model_args.resnet_depths,
            layer_type="basic",
            **labels,
        )
        return ResNetForImageClassification(config)
    config = ViTConfig(
        image_size=model_args.image_size,
        patch_size=model_args.patch_size,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        hidden_dropout_prob=model_args.dropout,
        **labels,
    )
    return ViTForImageClassification(config)


def main() -> None:
    # 1-4. Parse, check the output folder, logging, the checkpoint to resume from, seed
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, XSAMTrainingArguments, OutputDirArguments))
    model_args, data_args, training_args, _, last_checkpoint = start(
        parser,
        DATA_AND_MODEL_OPTIONS,
        EMBEDDED_DEFAULTS,
        logger,
        run_flags=RUN_FLAGS,
        models=(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING, "image classification models (ViT, ResNet)"),
    )

    # 5. Data
    dataset = check_columns(raw_images(data_args, model_args, training_args.seed), data_args)
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split > 0:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=training_args.seed)
        dataset = DatasetDict(train=split["train"], validation=split["test"])
    for split, flag in (("train", "do_train"), ("validation", "do_eval"), ("test", "do_predict")):
        if getattr(training_args, flag) and split not in dataset:
            raise UsageError(f"--{flag} needs a {split!r} split; the data has {', '.join(dataset)}")
    labels = next(iter(dataset.values())).features[data_args.label_column_name].names
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}

    # 6. Model and image processor
    if model_args.model_name_or_path is None:
        model = built_from_config(
            model_from_config(model_args, id2label), training_args, f"a {model_args.architecture}"
        )
        size = {"height": model_args.image_size, "width": model_args.image_size}
        image_processor = ViTImageProcessorPil(size=size, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
        with from_hub(f"the model {model_args.model_name_or_path!r}"):
            config = AutoConfig.from_pretrained(
                model_args.model_name_or_path,
                num_labels=len(labels),
                id2label=id2label,
                label2id=label2id,
                finetuning_task="image-classification",
                **hub,
            )
        if type(config) not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
            raise UsageError(
                f"{model_args.model_name_or_path} is a {config.model_type!r} model without an image-classification "
                "head; use a vision model such as ViT, DeiT, BEiT, Swin or ConvNeXT"
            )
        with from_hub(f"the model {model_args.model_name_or_path!r}"):
            model = AutoModelForImageClassification.from_pretrained(
                model_args.model_name_or_path,
                config=config,
                ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                **hub,
            )
        processor_name = model_args.image_processor_name or model_args.model_name_or_path
        with from_hub(f"the image processor {processor_name!r}"):
            image_processor = AutoImageProcessor.from_pretrained(processor_name, backend="pil", **hub)

    # 7. Preprocessing: Pillow augmentation of the training images (one generator per image, see
    # EpochSeededImages), then the image processor (resize, rescale, normalise)
    image_column, label_column = data_args.image_column_name, data_args.label_column_name

    def augment(image: PILImage.Image, rng: random.Random) -> PILImage.Image:
        if data_args.min_crop_scale < 1:
            image = random_resized_crop(image, data_args.min_crop_scale, rng)
        if data_args.horizontal_flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return image

    def transform(batch: dict[str, list], rngs: list[random.Random] | None = None) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch[image_column]]
        if rngs is not None:
            images = [augment(image, rng) for image, rng in zip(images, rngs)]
        pixel_values = image_processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": batch[label_column]}

    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_predict_samples,
    }
    for split, limit in limits.items():
        if split in dataset:
            if limit is not None:
                shuffled = dataset[split].shuffle(seed=training_args.seed)
                dataset[split] = shuffled.select(range(min(limit, len(shuffled))))
            if split == "train" and data_args.label_noise > 0:
                dataset[split] = add_label_noise(
                    dataset[split], label_column, data_args.label_noise, data_args.label_noise_seed
                )
            if split != "train":
                dataset[split].set_transform(transform)
    training_args.remove_unused_columns = False  # the transforms need the image column, unknown to the model

    # 8. Collator and metrics
    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.tensor([example["labels"] for example in examples]),
        }

    def compute_metrics(eval_pred) -> dict[str, float]:
        return {"accuracy": float(np.mean(np.argmax(eval_pred.predictions, axis=1) == eval_pred.label_ids))}

    # 9. Trainer
    eval_dataset = dataset["validation"] if training_args.do_eval else None
    if data_args.eval_train_samples > 0 and eval_dataset is not None and training_args.do_train:
        seen = dataset["train"].select(range(min(data_args.eval_train_samples, len(dataset["train"]))))
        eval_dataset = {"validation": eval_dataset, "train": seen.with_transform(transform)}
    train_images = (
        EpochSeededImages(dataset["train"], transform, training_args.seed) if training_args.do_train else None
    )
    trainer = build_trainer(
        XSAMTrainer,
        model=model,
        args=training_args,
        train_dataset=train_images,
        callbacks=[FollowEpoch(train_images)] if train_images is not None else None,
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate,
    )

    # 10. Train and evaluate
    if training_args.do_train:
        noise = {"label_noise": data_args.label_noise, "label_noise_seed": data_args.label_noise_seed}
        train_and_save(trainer, last_checkpoint, len(dataset["train"]), noise if data_args.label_noise > 0 else None)
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        record_metrics(trainer, "eval", trainer.evaluate(dataset["validation"]), len(dataset["validation"]))
    if training_args.do_predict:
        logger.info("*** Predict ***")
        results = trainer.predict(dataset["test"], metric_key_prefix="predict")
        record_metrics(trainer, "predict", results.metrics, len(dataset["test"]))

    # 11. Model card and push: the dataset's name and type and the task put the metrics into the Hub metadata
    embedded = (EMBEDDED_DATASET, EMBEDDED_DATASET_TYPE) if data_args.embedded else None
    folders = (data_args.train_dir, data_args.validation_dir)
    files = (data_args.train_file, data_args.validation_file, data_args.test_file)
    local_type = (
        "imagefolder" if any(folders) else "parquet" if next(filter(None, files), "").endswith(".parquet") else "json"
    )
    dataset_name, dataset_type = dataset_identity(embedded, data_args.dataset_name, folders + files, local_type)
    if data_args.label_noise > 0:
        dataset_name = (
            f"{dataset_name or 'local files'} with {data_args.label_noise:.0%} symmetric label noise "
            f"(seed {data_args.label_noise_seed})"
        )
    sizes = {split: len(data) for split, data in dataset.items()}
    task = f"classifies images into {len(labels)} classes ({', '.join(labels)})"
    finish(
        trainer,
        card_about(task, trainer.model, model_args.model_name_or_path, dataset_name, sizes, "images"),
        finetuned_from=model_args.model_name_or_path,
        tasks="image-classification",
        dataset=dataset_name,
        dataset_tags=dataset_type,
        dataset_args=data_args.dataset_config_name,
        tags=["image-classification", "vision"],
    )


if __name__ == "__main__":
    run(main)
