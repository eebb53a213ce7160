#!/usr/bin/env python
"""Train or fine-tune a translation model with XSAM: the ``run_translation.py`` of hf_xsam.

Fine-tune a pretrained model (Marian, T5/mT5, BART/mBART, NLLB) on a Hub dataset or on JSON lines files
(``{"translation": {"en": "...", "fr": "..."}}``), or train one from scratch: without
``--model_name_or_path`` a ``--model_type`` model is built from a config (sizes as flags) with a tokenizer
trained on the training data. BLEU and chrF come from sacrebleu on generated text.

With no data or model flags it runs offline: it makes an English-to-French corpus of number words
(num2words; train and validation numbers disjoint), trains a tokenizer and a small Marian model with XSAM,
and reports BLEU and chrF on the held-out numbers.

Examples:
    python scripts/translate.py
    accelerate launch scripts/translate.py --model_name_or_path Helsinki-NLP/opus-mt-en-ro \\
        --dataset_name wmt16 --dataset_config_name ro-en --source_lang en --target_lang ro \\
        --do_train --do_eval --predict_with_generate --output_dir opus-mt-en-ro-xsam --rho 0.05
    python scripts/translate.py --sam_method none  # the AdamW baseline of the embedded run
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import sacrebleu
import transformers.modelcard
from datasets import Dataset, DatasetDict
from num2words import num2words
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    MarianConfig,
    MarianMTModel,
    MBartTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
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
    pick_splits,
    record_metrics,
    run,
    shared_tokenizer,
    start,
    train_and_save,
)
from hf_xsam import XSAMSeq2SeqTrainer, XSAMSeq2SeqTrainingArguments

logger = logging.getLogger(__name__)

# The Trainer's card keeps a result in the Hub metadata (`model-index`) only for the tasks it has a name for, and
# translation is not among them: without this, the BLEU of every card would be dropped.
transformers.modelcard.TASK_TAG_TO_NAME_MAPPING.setdefault("translation", "Translation")

SCRATCH_MODELS = {"marian": MarianMTModel, "t5": T5ForConditionalGeneration}
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2: T5's convention, also used for Marian
# without any of these options the script runs on its embedded corpus and model, with EMBEDDED_DEFAULTS
DATA_AND_MODEL_OPTIONS = {"model_name_or_path", "dataset_name", "train_file", "validation_file", "test_file"}
EMBEDDED_DATASET = "num2words English-French numbers (generated)"
EMBEDDED_DATASET_TYPE = "num2words-en-fr"  # not a Hub dataset: the model-index needs a type, this one names the source
RUN_FLAGS = ("do_train", "do_eval", "do_predict")
EMBEDDED_DEFAULTS = {
    "output_dir": "xsam-marian-numbers-en-fr",
    "do_train": True,
    "do_eval": True,
    "predict_with_generate": True,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.01,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "logging_steps": 50,
    "save_strategy": "no",
    "rho": 0.05,
}


@dataclass
class ModelArguments:
    """What to fine-tune, or which model to build from a config."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to fine-tune (Hub id or local folder). Leave empty to train from scratch."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer (Hub id or folder) if not the one of --model_name_or_path."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and data."})
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the checkpoint."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models and datasets."})
    model_type: str = field(
        default="marian",
        metadata={"help": "From scratch: the architecture built from a config.", "choices": list(SCRATCH_MODELS)},
    )
    vocab_size: int = field(
        default=8000, metadata={"help": "From scratch: size of the tokenizer trained on the data."}
    )
    d_model: int = field(default=128, metadata={"help": "From scratch: hidden size."})
    num_layers: int = field(default=2, metadata={"help": "From scratch: layers of the encoder and of the decoder."})
    num_heads: int = field(default=4, metadata={"help": "From scratch: attention heads."})
    ffn_dim: int = field(default=512, metadata={"help": "From scratch: feed-forward size."})
    dropout: float = field(default=0.1, metadata={"help": "From scratch: dropout probability."})


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on, and how to tokenize it."""

    source_lang: str | None = field(
        default=None,
        metadata={
            "help": "Source language: key of the `translation` dicts (or a column). A multilingual tokenizer's code "
            "such as en_XX also works: the part before '_' is the key. Embedded data: en."
        },
    )
    target_lang: str | None = field(
        default=None, metadata={"help": "Target language, as --source_lang. Embedded: fr."}
    )
    source_lang_code: str | None = field(
        default=None,
        metadata={"help": "Multilingual tokenizers: source code (mBART en_XX, NLLB eng_Latn); default --source_lang."},
    )
    target_lang_code: str | None = field(
        default=None, metadata={"help": "Multilingual tokenizers: target code; default --target_lang."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset on the Hub (datasets library)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of --dataset_name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data, JSON lines."})
    validation_file: str | None = field(default=None, metadata={"help": "Validation data (BLEU, chrF), JSON lines."})
    test_file: str | None = field(default=None, metadata={"help": "Test data for --do_predict, JSON lines."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Tokenize again instead of using the cache."})
    max_source_length: int = field(default=128, metadata={"help": "Source length after tokenization (truncated)."})
    max_target_length: int = field(default=128, metadata={"help": "Target length after tokenization (truncated)."})
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "Target length for evaluation, and `max_length` of generation; default --max_target_length."
        },
    )
    num_beams: int | None = field(default=None, metadata={"help": "Beams of `generate` in evaluation and prediction."})
    source_prefix: str | None = field(
        default=None, metadata={"help": "Text put before every source (T5: 'translate English to French: ')."}
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={"help": "Token forced first in generation; default the target code for mBART-50, M2M100 and NLLB."},
    )
    ignore_pad_token_for_loss: bool = field(default=True, metadata={"help": "Leave label padding out of the loss."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only this many test examples."})
    num_embedded_train: int = field(default=10000, metadata={"help": "Embedded corpus: training pairs."})
    num_embedded_eval: int = field(default=500, metadata={"help": "Embedded corpus: held-out pairs."})

    def __post_init__(self) -> None:
        for name in ("train_file", "validation_file", "test_file"):
            path = getattr(self, name)
            if path is not None and path.rsplit(".", 1)[-1] not in ("json", "jsonl"):
                raise ValueError(f"--{name} must be a JSON lines file (.json or .jsonl), got {path!r}")
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("Give either --dataset_name or --train_file/--validation_file, not both")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length
        if self.embedded:
            self.source_lang, self.target_lang = self.source_lang or "en", self.target_lang or "fr"
        elif self.source_lang is None or self.target_lang is None:
            raise ValueError(
                "Pass --source_lang and --target_lang: the keys of the `translation` dicts, e.g. en and fr"
            )

    @property
    def embedded(self) -> bool:
        return self.dataset_name is None and not (self.train_file or self.validation_file or self.test_file)


def number_corpus(num_train: int, num_eval: int, seed: int = 0) -> DatasetDict:
    """English and French number words of distinct numbers below one million, drawn log-uniformly.

    Example:
        >>> corpus = number_corpus(3, 1)
        >>> corpus["train"].num_rows, corpus["validation"].num_rows
        (3, 1)
        >>> sorted(corpus["validation"][0]["translation"])
        ['en', 'fr']
    """
    if num_train + num_eval > 500_000:
        raise ValueError(f"The number corpus holds at most 500000 pairs, asked for {num_train + num_eval}")
    rng = random.Random(seed)
    numbers: dict[int, None] = {}  # insertion-ordered set: the split is reproducible
    while len(numbers) < num_train + num_eval:
        numbers[int(10 ** rng.uniform(0, 6))] = None
    pairs = [{"en": num2words(n, lang="en"), "fr": num2words(n, lang="fr")} for n in numbers]
    return DatasetDict(
        train=Dataset.from_dict({"translation": pairs[:num_train]}),
        validation=Dataset.from_dict({"translation": pairs[num_train:]}),
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int) -> PreTrainedTokenizerFast:
    """A BPE tokenizer (SentencePiece-style spaces, punctuation split off) trained on ``texts``; every sequence
    ends with ``</s>``."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.NFKC()
    # punctuation apart, so that "twenty-one" is "twenty", "-", "one" rather than one more word to learn
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos_id)]
    )
    special = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=model_max_length, **special)


def scratch_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerBase, max_length: int) -> PreTrainedModel:
    """A ``--model_type`` model built from a config with the size flags, randomly initialised."""
    ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }
    if model_args.model_type == "marian":
        config = MarianConfig(
            **ids,
            decoder_vocab_size=len(tokenizer),
            forced_eos_token_id=tokenizer.eos_token_id,
            d_model=model_args.d_model,
            encoder_layers=model_args.num_layers,
            decoder_layers=model_args.num_layers,
            encoder_attention_heads=model_args.num_heads,
            decoder_attention_heads=model_args.num_heads,
            encoder_ffn_dim=model_args.ffn_dim,
            decoder_ffn_dim=model_args.ffn_dim,
            dropout=model_args.dropout,
            max_position_embeddings=max_length,
            scale_embedding=True,  # as in the released Marian models: token embeddings on the scale of positions
            share_encoder_decoder_embeddings=True,
        )
    else:
        config = T5Config(
            **ids,
            d_model=model_args.d_model,
            d_kv=model_args.d_model // model_args.num_heads,
            d_ff=model_args.ffn_dim,
            num_layers=model_args.num_layers,
            num_decoder_layers=model_args.num_layers,
            num_heads=model_args.num_heads,
            dropout_rate=model_args.dropout,
        )
    return SCRATCH_MODELS[model_args.model_type](config)


def language_keys(dataset: Dataset, data_args: DataTrainingArguments) -> tuple[str, str, str | None]:
    """The source and target keys, and the column holding `{lang: text}` dicts (None: one column per language)."""
    columns = dataset.column_names
    if "translation" in columns:
        found = sorted(dataset[0]["translation"].keys())
        column = "translation"
    else:
        found, column = columns, None
    keys = []
    for flag, lang in (("source_lang", data_args.source_lang), ("target_lang", data_args.target_lang)):
        key = lang if lang in found else lang.split("_")[0]
        if key not in found:
            where = "languages in the `translation` column" if column else "columns (no `translation` column)"
            raise UsageError(f"--{flag} {lang!r} is not in the dataset; found {where}: {', '.join(found)}")
        keys.append(key)
    return keys[0], keys[1], column


def set_language_codes(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data_args: DataTrainingArguments
) -> str | None:
    """Set the language codes of a multilingual tokenizer (mBART, mBART-50, M2M100, NLLB).

    Returns the token to force first in generation: ``--forced_bos_token``, else the target code, except for
    mBART-cc25, which starts decoding with the target code instead.
    """
    source_code = data_args.source_lang_code or data_args.source_lang
    target_code = data_args.target_lang_code or data_args.target_lang
    for flag, code in (("source_lang_code", source_code), ("target_lang_code", target_code)):
        if tokenizer.convert_tokens_to_ids(code) in (None, tokenizer.unk_token_id):
            raise UsageError(
                f"{type(tokenizer).__name__} needs language codes, and {code!r} is not one of its tokens: pass "
                f"--{flag} (e.g. en_XX for mBART, eng_Latn for NLLB)"
            )
    tokenizer.src_lang, tokenizer.tgt_lang = source_code, target_code
    if isinstance(tokenizer, MBartTokenizer):
        if model.config.decoder_start_token_id is None:
            model.config.decoder_start_token_id = tokenizer.convert_tokens_to_ids(target_code)
        return data_args.forced_bos_token
    return data_args.forced_bos_token or target_code


def main() -> None:
    # 1-4. Parse, check the output folder, logging, the checkpoint to resume from, seed
    parser = HfArgumentParser(
        (ModelArguments, DataTrainingArguments, XSAMSeq2SeqTrainingArguments, OutputDirArguments)
    )
    model_args, data_args, training_args, _, last_checkpoint = start(
        parser,
        DATA_AND_MODEL_OPTIONS,
        EMBEDDED_DEFAULTS,
        logger,
        run_flags=RUN_FLAGS,
        models=(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, "encoder-decoder models (Marian, T5, BART, NLLB)"),
    )

    # 5. Data
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.embedded:
        raw_datasets = number_corpus(
            data_args.num_embedded_train, data_args.num_embedded_eval, seed=training_args.seed
        )
    else:
        files = {"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file}
        raw_datasets = load_data(data_args.dataset_name, data_args.dataset_config_name, files, **hub)
    wanted = {
        "train": ("train", "do_train", data_args.max_train_samples),
        "validation": ("validation", "do_eval", data_args.max_eval_samples),
        "test": ("test", "do_predict", data_args.max_predict_samples),
    }
    splits = pick_splits(raw_datasets, training_args, wanted)
    source_key, target_key, column = language_keys(next(iter(splits.values())), data_args)

    def pairs(batch: dict[str, list]) -> tuple[list[str], list[str]]:
        if column is None:
            return batch[source_key], batch[target_key]
        return [ex[source_key] for ex in batch[column]], [ex[target_key] for ex in batch[column]]

    # 6. Model and tokenizer
    forced_bos_token = data_args.forced_bos_token
    max_length = max(data_args.max_source_length, data_args.max_target_length, data_args.val_max_target_length)
    if model_args.model_name_or_path is None:
        tokenizer_source = model_args.tokenizer_name or last_checkpoint
        if tokenizer_source is not None:
            with from_hub(f"the tokenizer {tokenizer_source!r}"):
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, **hub)
        elif "train" not in splits:
            raise UsageError("Training from scratch (no --model_name_or_path) needs --do_train and training data")
        else:
            # a generator: only the process that trains the tokenizer reads the texts
            texts = (text for batch in splits["train"].iter(batch_size=1000) for side in pairs(batch) for text in side)
            tokenizer = shared_tokenizer(
                training_args, lambda: train_tokenizer(texts, model_args.vocab_size, max_length)
            )
        model = scratch_model(model_args, tokenizer, max_length)
        model.generation_config.max_length = data_args.val_max_target_length
        built_from_config(model, training_args, f"a {model_args.model_type} model")
    else:
        hub["revision"] = model_args.model_revision
        with from_hub(f"the model {model_args.model_name_or_path!r}"):
            config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub)
        if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
            raise UsageError(
                f"{model_args.model_name_or_path} is a {config.model_type!r} model (architectures: "
                f"{', '.join(config.architectures or ['unknown'])}) without a sequence-to-sequence head; translation "
                "needs an encoder-decoder model such as Marian, T5/mT5, BART/mBART or NLLB"
            )
        tokenizer_name = model_args.tokenizer_name or model_args.model_name_or_path
        with from_hub(f"the tokenizer {tokenizer_name!r}"):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, **hub)
        with from_hub(f"the model {model_args.model_name_or_path!r}"):
            model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path, config=config, **hub)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
        if hasattr(tokenizer, "set_src_lang_special_tokens"):
            forced_bos_token = set_language_codes(model, tokenizer, data_args)
        if config.model_type == "t5" and data_args.source_prefix is None:
            logger.warning("T5 expects a task prefix, e.g. --source_prefix 'translate English to French: '")
    if model.config.decoder_start_token_id is None:
        raise UsageError(
            f"{type(model).__name__} has no `config.decoder_start_token_id`: set it in the model's config"
        )
    if forced_bos_token is not None:
        model.generation_config.forced_bos_token_id = tokenizer.convert_tokens_to_ids(forced_bos_token)

    # 7. Preprocessing
    prefix = data_args.source_prefix or ""
    label_pad = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id

    def preprocess(batch: dict[str, list], max_target_length: int) -> dict[str, list]:
        sources, targets = pairs(batch)
        inputs = tokenizer(
            [prefix + text for text in sources], max_length=data_args.max_source_length, truncation=True
        )
        inputs["labels"] = tokenizer(text_target=targets, max_length=max_target_length, truncation=True)["input_ids"]
        return inputs

    tokenized = {}
    for split, dataset in splits.items():
        target_length = data_args.max_target_length if split == "train" else data_args.val_max_target_length
        with training_args.main_process_first(desc=f"tokenizing the {split} split"):
            tokenized[split] = dataset.map(
                preprocess,
                batched=True,
                fn_kwargs={"max_target_length": target_length},
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Tokenizing the {split} split",
            )

    # 8. Collator and metrics
    data_collator = DataCollatorForSeq2Seq(
        tokenizer, model=model, label_pad_token_id=label_pad, pad_to_multiple_of=8 if training_args.fp16 else None
    )

    def compute_metrics(eval_preds) -> dict[str, float]:
        predictions, labels = eval_preds
        predictions = predictions[0] if isinstance(predictions, tuple) else predictions
        predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
        labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
        hypotheses = [text.strip() for text in tokenizer.batch_decode(predictions, skip_special_tokens=True)]
        references = [text.strip() for text in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {
            "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
            "gen_len": float(np.mean(np.count_nonzero(predictions != tokenizer.pad_token_id, axis=1))),
        }

    # 9. Trainer
    trainer = build_trainer(
        XSAMSeq2SeqTrainer,
        model=model,
        args=training_args,
        train_dataset=tokenized.get("train"),
        eval_dataset=tokenized.get("validation"),
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )

    # 10. Train, evaluate, predict
    generation = {
        "max_length": training_args.generation_max_length or data_args.val_max_target_length,
        "num_beams": data_args.num_beams or training_args.generation_num_beams,
    }
    if training_args.do_train:
        train_and_save(trainer, last_checkpoint, len(tokenized["train"]))
    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(metric_key_prefix="eval", **generation)
        record_metrics(trainer, "eval", metrics, len(tokenized["validation"]))
    if training_args.do_predict:
        logger.info("*** Predict ***")
        results = trainer.predict(tokenized["test"], metric_key_prefix="predict", **generation)
        record_metrics(trainer, "predict", results.metrics, len(tokenized["test"]))
        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            predictions = np.where(results.predictions != -100, results.predictions, tokenizer.pad_token_id)
            lines = tokenizer.batch_decode(predictions, skip_special_tokens=True)
            with open(os.path.join(training_args.output_dir, "generated_predictions.txt"), "w") as f:
                f.write("\n".join(line.strip() for line in lines) + "\n")

    # 11. Model card and push: the dataset's name and type and the task put the metrics into the Hub metadata
    dataset_name, dataset_type = dataset_identity(
        (EMBEDDED_DATASET, EMBEDDED_DATASET_TYPE) if data_args.embedded else None,
        data_args.dataset_name,
        (data_args.train_file, data_args.validation_file, data_args.test_file),
        "json",
    )
    sizes = {split: len(data) for split, data in tokenized.items()}
    finish(
        trainer,
        card_about(
            f"translates {source_key} to {target_key}",
            trainer.model,
            model_args.model_name_or_path,
            dataset_name,
            sizes,
            "pairs",
        ),
        finetuned_from=model_args.model_name_or_path,
        tasks="translation",
        language=[source_key, target_key],
        dataset=dataset_name,
        dataset_tags=dataset_type,
        dataset_args=data_args.dataset_config_name,
    )


if __name__ == "__main__":
    run(main)
