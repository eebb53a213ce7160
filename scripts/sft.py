#!/usr/bin/env python
"""Supervised fine-tuning of a causal language model with XSAM: TRL's ``sft.py`` of hf_xsam.

Fine-tune a checkpoint (``--model_name_or_path``; LoRA with ``--use_peft`` and TRL's ``--lora_*`` flags) on a
Hub dataset or on JSON lines files in one of the formats ``SFTTrainer`` takes: ``{"messages": [...]}`` (chat),
``{"prompt": ..., "completion": ...}`` (instructions; the loss is on the completion only) or ``{"text": ...}``.
Without ``--model_name_or_path`` a small Llama is built from a config (sizes as flags) with a tokenizer trained on
the training data. Evaluation reports SFT's loss, token accuracy and entropy, and, for instruction data, the
exact match of greedy completions.

With no data or model flags it runs offline: it generates instructions about numbers ("write 3,482 in words:" ->
"three thousand, four hundred and eighty-two", ordinals, years; held-out pairs disjoint from the training ones),
trains a tokenizer and a small Llama with XSAM, and reports the held-out exact match.

Examples:
    python scripts/sft.py
    accelerate launch scripts/sft.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --use_peft --lora_r 16 --lora_alpha 32 --do_train --do_eval --dataset_test_split test \\
        --learning_rate 2e-4 --output_dir qwen-capybara-xsam --rho 0.05
    python scripts/sft.py --sam_method none  # the AdamW baseline of the embedded run
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
import transformers.modelcard
from datasets import Dataset, DatasetDict
from num2words import num2words
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from trl import ModelConfig, get_peft_config
from trl.data_utils import is_conversational

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
    pick_splits,
    record_metrics,
    run,
    shared_tokenizer,
    start,
    train_and_save,
)
from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer

logger = logging.getLogger(__name__)

# The Trainer's card keeps a result in the Hub metadata (`model-index`) only for the metrics it has a name for:
# without this, the exact match of every card would be dropped.
if "exact_match" not in transformers.modelcard.METRIC_TAGS:
    transformers.modelcard.METRIC_TAGS.append("exact_match")

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
# without any of these options the script runs on its embedded instructions and model, with EMBEDDED_DEFAULTS
DATA_AND_MODEL_OPTIONS = {"model_name_or_path", "dataset_name", "train_file", "validation_file"}
EMBEDDED_DATASET = "num2words instructions (generated)"
EMBEDDED_DATASET_TYPE = "num2words-instructions"  # not a Hub dataset: the model-index needs a type, this one names it
EMBEDDED_DEFAULTS = {
    "output_dir": "xsam-llama-number-words",
    "do_train": True,
    "do_eval": True,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
    "num_train_epochs": 4,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 100,
    "logging_steps": 50,
    "save_strategy": "no",
    "max_length": 64,
    "bf16": False,
    "gradient_checkpointing": False,
    "rho": 0.05,
}
# (instruction, num2words `to`, numbers drawn from)
TASKS = (
    ("write {n:,} in words:", "cardinal", range(10_000)),
    ("write {n:,} as an ordinal in words:", "ordinal", range(1, 10_000)),
    ("read {n} as a year:", "year", range(1000, 2100)),
)


@dataclass
class ModelArguments(ModelConfig):
    """TRL's model flags (``--model_name_or_path``, ``--use_peft``, ``--lora_*``, ``--dtype``) and the sizes of a
    model built from a config when no checkpoint is given."""

    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub id or folder) if not the one of --model_name_or_path."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    vocab_size: int = field(default=400, metadata={"help": "From scratch: size of the tokenizer trained on the data."})
    hidden_size: int = field(default=128, metadata={"help": "From scratch: hidden size."})
    intermediate_size: int = field(default=384, metadata={"help": "From scratch: feed-forward size."})
    num_layers: int = field(default=2, metadata={"help": "From scratch: decoder layers."})
    num_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub (datasets library)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    dataset_test_split: str = field(default="validation", metadata={"help": "Split of --dataset_name to evaluate on."})
    train_file: str | None = field(default=None, metadata={"help": "Training data, JSON lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Evaluation data, JSON lines."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})
    max_new_tokens: int = field(
        default=32, metadata={"help": "Instruction data: length of the greedy completions scored by exact match."}
    )
    num_embedded_train: int = field(default=6000, metadata={"help": "Embedded instructions: training examples."})
    num_embedded_eval: int = field(default=300, metadata={"help": "Embedded instructions: held-out examples."})

    def __post_init__(self) -> None:
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("json", "jsonl"):
                raise ValueError(f"--{name} must be a JSON lines file (.json or .jsonl), got {path!r}")
        if self.dataset_name is not None and (self.train_file or self.validation_file):
            raise ValueError("Give either --dataset_name or --train_file/--validation_file, not both")

    @property
    def embedded(self) -> bool:
        return self.dataset_name is None and not (self.train_file or self.validation_file)


def number_instructions(num_train: int, num_eval: int, seed: int = 0) -> DatasetDict:
    """Distinct (task, number) instructions with their num2words answers; the held-out ones are not trained on.

    Example:
        >>> corpus = number_instructions(4, 2)
        >>> corpus["train"].num_rows, corpus["validation"].num_rows
        (4, 2)
        >>> corpus["train"][1]
        {'prompt': 'write 4,242 in words:', 'completion': ' four thousand, two hundred and forty-two'}
    """
    capacity = sum(len(numbers) for _, _, numbers in TASKS)
    if num_train + num_eval > capacity:
        raise ValueError(
            f"The embedded instructions hold at most {capacity} examples, asked for {num_train + num_eval}"
        )
    rng = random.Random(seed)
    chosen: dict[tuple[int, int], None] = {}  # insertion-ordered set: the split is reproducible
    while len(chosen) < num_train + num_eval:
        task = rng.randrange(len(TASKS))
        chosen[task, rng.choice(TASKS[task][2])] = None
    prompts = [TASKS[task][0].format(n=n) for task, n in chosen]
    completions = [" " + num2words(n, to=TASKS[task][1]) for task, n in chosen]
    return DatasetDict(
        train=Dataset.from_dict({"prompt": prompts[:num_train], "completion": completions[:num_train]}),
        validation=Dataset.from_dict({"prompt": prompts[num_train:], "completion": completions[num_train:]}),
    )


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on ``texts``: SentencePiece-style spaces, punctuation apart, one token per digit."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def scratch_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedModel:
    """A Llama built from a config with the size flags, randomly initialised."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_layers,
        num_attention_heads=model_args.num_heads,
        num_key_value_heads=model_args.num_heads,
        max_position_embeddings=max_length,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def training_texts(dataset: Dataset, text_field: str) -> list[str]:
    """The strings a tokenizer is trained on: prompts and completions, or the text field."""
    columns = [c for c in ("prompt", "completion") if c in dataset.column_names] or [text_field]
    return [text for column in columns for text in dataset[column]]


@torch.no_grad()
def exact_match(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dataset: Dataset, batch_size: int, max_new_tokens: int
) -> float:
    """Share of prompts whose greedy completion equals the reference completion (whitespace stripped)."""
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    hits = 0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            inputs = tokenizer(rows["prompt"], return_tensors="pt", padding=True).to(model.device)
            inputs.pop("token_type_ids", None)
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            answers = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += sum(a.strip() == r.strip() for a, r in zip(answers, rows["completion"]))
    finally:
        tokenizer.padding_side = padding_side
    return hits / max(len(dataset), 1)


def main() -> None:
    # 1-4. Parse, check the output folder, logging, the checkpoint to resume from, seed
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, XSAMSFTConfig, OutputDirArguments))
    model_args, data_args, training_args, _, last_checkpoint = start(
        parser,
        DATA_AND_MODEL_OPTIONS,
        EMBEDDED_DEFAULTS,
        logger,
        models=(MODEL_FOR_CAUSAL_LM_MAPPING, "causal language models"),
    )

    # 5. Data
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.embedded:
        raw = number_instructions(data_args.num_embedded_train, data_args.num_embedded_eval, seed=training_args.seed)
        names = {"train": "train", "validation": "validation"}
    else:
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        raw = load_data(data_args.dataset_name, data_args.dataset_config_name, files, **hub)
        if data_args.dataset_name is not None:
            names = {"train": data_args.dataset_train_split, "validation": data_args.dataset_test_split}
        else:
            names = {"train": "train", "validation": "validation"}
    wanted = {
        "train": (names["train"], "do_train", data_args.max_train_samples),
        "validation": (names["validation"], "do_eval", data_args.max_eval_samples),
    }
    splits = pick_splits(raw, training_args, wanted)

    # 6. Model and tokenizer
    max_length = training_args.max_length or 1024
    if model_args.model_name_or_path is None:
        tokenizer_source = model_args.tokenizer_name or last_checkpoint
        if tokenizer_source is not None:
            with from_hub(f"the tokenizer {tokenizer_source!r}"):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **hub)
        elif "train" not in splits:
            raise UsageError("Training from scratch (no --model_name_or_path) needs --do_train and training data")
        elif is_conversational(splits["train"][0]):
            raise UsageError(
                "Chat data needs a tokenizer with a chat template: pass --model_name_or_path (or --tokenizer_name), "
                "or use prompt/completion or text data to train from scratch"
            )
        else:
            texts = training_texts(splits["train"], training_args.dataset_text_field)
            tokenizer = shared_tokenizer(
                training_args, lambda: train_tokenizer(texts, model_args.vocab_size, max_length)
            )
        model = built_from_config(scratch_model(model_args, tokenizer, max_length), training_args, "a Llama model")
    else:
        hub["revision"] = model_args.model_revision
        with from_hub(f"the model {model_args.model_name_or_path!r}"):
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path,
                dtype=model_args.dtype,
                attn_implementation=model_args.attn_implementation,
                trust_remote_code=training_args.trust_remote_code,
                **hub,
            )
        tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
        with from_hub(f"the tokenizer {tokenizer_name!r}"):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, **hub)
    peft_config = get_peft_config(model_args)

    # 7-9. Preprocessing, collator and trainer: SFTTrainer tokenizes, masks prompts and packs itself
    trainer = build_trainer(
        XSAMSFTTrainer,
        model=model,
        args=training_args,
        train_dataset=splits.get("train"),
        eval_dataset=splits.get("validation"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if peft_config is not None:
        trainer.model.print_trainable_parameters()

    # 10. Train and evaluate
    if training_args.do_train:
        train_and_save(trainer, last_checkpoint, len(splits["train"]))
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        validation = splits["validation"]
        metrics = trainer.evaluate()
        instructions = {"prompt", "completion"} <= set(validation.column_names)
        if instructions and not is_conversational(validation[0]):
            metrics["eval_exact_match"] = exact_match(
                trainer.model,
                tokenizer,
                validation,
                training_args.per_device_eval_batch_size,
                data_args.max_new_tokens,
            )
            # the card reads the evaluation from the log history, where `evaluate` put the other metrics
            trainer.state.log_history[-1]["eval_exact_match"] = metrics["eval_exact_match"]
        record_metrics(trainer, "eval", metrics, len(validation))

    # 11. Model card and push: the dataset's name and type and the task put the metrics into the Hub metadata
    dataset_name, dataset_type = dataset_identity(
        (EMBEDDED_DATASET, EMBEDDED_DATASET_TYPE) if data_args.embedded else None,
        data_args.dataset_name,
        (data_args.train_file, data_args.validation_file),
        "json",
    )
    sizes = {split: len(data) for split, data in splits.items()}
    finish(
        trainer,
        card_about("generates text", trainer.model, model_args.model_name_or_path, dataset_name, sizes, "examples"),
        finetuned_from=model_args.model_name_or_path,
        tasks="text-generation",
        dataset=dataset_name,
        dataset_tags=dataset_type,
        dataset_args=data_args.dataset_config_name,
    )


if __name__ == "__main__":
    run(main)
