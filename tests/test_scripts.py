"""The example scripts end to end on tiny settings, their errors, and their 2-process launch."""

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, Value
from huggingface_hub import ModelCard
from huggingface_hub.errors import OfflineModeIsEnabled
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    HfArgumentParser,
    M2M100Config,
    M2M100ForConditionalGeneration,
    MBartTokenizer,
    NllbTokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

import _common
import classify_images
import translate
from helpers import TINY_VIT
from hf_xsam import XSAMSeq2SeqTrainingArguments
from hf_xsam.ascent import AdaptiveAscent

SCRIPTS = Path(__file__).parent.parent / "scripts"

COMMON = [
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--use_cpu",
    "true",
    "--logging_steps",
    "1",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "16",
]
TINY_MARIAN = [
    "--d_model",
    "16",
    "--ffn_dim",
    "32",
    "--num_layers",
    "1",
    "--num_heads",
    "2",
    "--vocab_size",
    "120",
    "--max_target_length",
    "24",
]
EMBEDDED_TRANSLATION = ["--num_embedded_train", "48", "--num_embedded_eval", "16"]


def run(script, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [script.__file__, *map(str, args)])
    script.main()


def read_json(path):
    return json.loads(Path(path).read_text())


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def translation_files(tmp_path, n=32, column=True):
    pairs = translate.number_corpus(n, 8, seed=1)
    files = {}
    for split, name in (("train", "train"), ("validation", "valid")):
        rows = pairs[split]["translation"]
        files[split] = write_jsonl(tmp_path / f"{name}.jsonl", [{"translation": r} if column else r for r in rows])
    return files


# --------------------------------------------------------------------------------------------------
# translate.py


def test_number_corpus_is_reproducible_and_disjoint():
    corpus = translate.number_corpus(300, 50, seed=3)
    train = {pair["en"] for pair in corpus["train"]["translation"]}
    held_out = [pair["en"] for pair in corpus["validation"]["translation"]]
    assert len(train) == 300 and len(set(held_out)) == 50 and not train & set(held_out)
    assert corpus["validation"]["translation"] == translate.number_corpus(300, 50, seed=3)["validation"]["translation"]
    assert {"en": "twenty-one", "fr": "vingt et un"} in translate.number_corpus(2000, 0, seed=0)["train"][
        "translation"
    ]


def test_translate_embedded_run_saves_model_tokenizer_metrics_and_card(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(
        translate,
        monkeypatch,
        "--output_dir",
        out,
        *EMBEDDED_TRANSLATION,
        *TINY_MARIAN,
        *COMMON,
        "--max_steps",
        3,
        "--alpha_search_interval",
        2,
    )
    metrics = read_json(out / "eval_results.json")
    assert {"eval_bleu", "eval_chrf", "eval_loss", "eval_gen_len"} <= metrics.keys()
    state = read_json(out / "trainer_state.json")
    assert state["global_step"] == 3 and any("xsam/alpha" in log for log in state["log_history"])

    card = ModelCard.load(out / "README.md")
    assert {"xsam", "sharpness-aware-minimization"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.language == ["en", "fr"]
    assert "| rho | 0.05 |" in card.text and "| alpha_search_interval | 2 |" in card.text
    assert "trained from scratch" in card.text
    # BLEU and chrF reach the Hub metadata (model-index), with the same task and dataset
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results.keys() == {"bleu", "chrf"} and card.data.metrics == ["bleu", "chrf"]
    for name, result in results.items():
        assert (result.task_type, result.dataset_name, result.dataset_type) == (
            "translation",
            translate.EMBEDDED_DATASET,
            "num2words-en-fr",
        )
        assert result.metric_value == metrics[f"eval_{name}"]
    # what the script knows replaces the Trainer's placeholders; no empty heading, the optimizer as its flag
    assert "More information needed" not in card.text and "### Training results" not in card.text
    assert f"{translate.EMBEDDED_DATASET}: 48 training pairs" in card.text and "translates en to fr" in card.text
    assert re.search(r"^- optimizer: adamw_torch\w* \(betas \(0\.9,0\.999\), epsilon 1e-08\)$", card.text, re.M)

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    generated = model.generate(**tokenizer(["twenty-one"], return_tensors="pt"), max_new_tokens=5)
    assert isinstance(tokenizer.decode(generated[0], skip_special_tokens=True), str)


def test_translate_t5_from_json_config_with_files_and_predict(tmp_path, monkeypatch):
    files = translation_files(tmp_path)
    test = write_jsonl(tmp_path / "test.jsonl", [{"translation": {"en": "seven", "fr": "sept"}}] * 5)
    config = {
        "model_type": "t5", "train_file": str(files["train"]), "validation_file": str(files["validation"]),
        "test_file": str(test), "source_lang": "en", "target_lang": "fr", "source_prefix": "translate: ",
        "output_dir": str(tmp_path / "out"), "do_train": True, "do_eval": True, "do_predict": True,
        "predict_with_generate": True, "max_steps": 2, "sam_method": "sam", "report_to": "none",
        "disable_tqdm": True, "use_cpu": True, "per_device_train_batch_size": 8,
        "d_model": 16, "ffn_dim": 32, "num_layers": 1, "num_heads": 2, "vocab_size": 120, "max_target_length": 24,
    }  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(config))
    run(translate, monkeypatch, tmp_path / "args.json")
    assert len((tmp_path / "out" / "generated_predictions.txt").read_text().splitlines()) == 5
    assert "predict_bleu" in read_json(tmp_path / "out" / "predict_results.json")
    assert "| sam_method | sam |" in ModelCard.load(tmp_path / "out" / "README.md").text


def test_translate_fine_tunes_a_checkpoint_on_one_column_per_language(tmp_path, monkeypatch):
    files = translation_files(tmp_path, column=False)
    model_args = translate.ModelArguments(d_model=16, ffn_dim=32, num_layers=1, num_heads=2)
    tokenizer = translate.train_tokenizer(["one two three", "un deux trois"], vocab_size=60, model_max_length=128)
    translate.scratch_model(model_args, tokenizer, max_length=128).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    run(
        translate,
        monkeypatch,
        "--model_name_or_path",
        tmp_path / "ckpt",
        "--train_file",
        files["train"],
        "--validation_file",
        files["validation"],
        "--source_lang",
        "en",
        "--target_lang",
        "fr",
        "--do_train",
        "--do_eval",
        "--predict_with_generate",
        "--max_steps",
        2,
        "--sam_method",
        "none",
        "--output_dir",
        tmp_path / "out",
        *COMMON,
    )
    assert "eval_chrf" in read_json(tmp_path / "out" / "eval_results.json")
    assert "| sam_method | none |" in ModelCard.load(tmp_path / "out" / "README.md").text


def test_translate_fine_tunes_an_nllb_style_model_with_language_codes(tmp_path, monkeypatch):
    files = translation_files(tmp_path)
    tokenizer = NllbTokenizer()  # special tokens and language codes only: enough to run the path offline
    M2M100ForConditionalGeneration(M2M100Config(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=2,
    )).save_pretrained(tmp_path / "nllb")  # fmt: skip
    tokenizer.save_pretrained(tmp_path / "nllb")
    run(
        translate,
        monkeypatch,
        "--model_name_or_path",
        tmp_path / "nllb",
        "--train_file",
        files["train"],
        "--validation_file",
        files["validation"],
        "--source_lang",
        "en",
        "--target_lang",
        "fr",
        "--source_lang_code",
        "eng_Latn",
        "--target_lang_code",
        "fra_Latn",
        "--do_train",
        "--do_eval",
        "--predict_with_generate",
        "--max_steps",
        1,
        "--max_target_length",
        8,
        "--output_dir",
        tmp_path / "out",
        *COMMON,
    )
    generation = read_json(tmp_path / "out" / "generation_config.json")
    assert generation["forced_bos_token_id"] == tokenizer.convert_tokens_to_ids("fra_Latn")


def test_language_codes_are_checked_and_mbart_starts_with_the_target_code():
    data_args = translate.DataTrainingArguments(source_lang="en", target_lang="fr")
    with pytest.raises(
        ValueError,
        match=r"NllbTokenizer needs language codes, and 'en' is not one of its tokens: "
        r"pass --source_lang_code",
    ):
        translate.set_language_codes(None, NllbTokenizer(), data_args)

    tokenizer, model = MBartTokenizer(), SimpleNamespace(config=SimpleNamespace(decoder_start_token_id=None))
    data_args = translate.DataTrainingArguments(source_lang="en_XX", target_lang="fr_XX")
    assert translate.set_language_codes(model, tokenizer, data_args) is None  # mBART-cc25 forces nothing
    assert (tokenizer.src_lang, tokenizer.tgt_lang) == ("en_XX", "fr_XX")
    assert model.config.decoder_start_token_id == tokenizer.convert_tokens_to_ids("fr_XX")


def bert_checkpoint(path):
    BertModel(
        BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    ).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "case, match",
    [
        ("language", r"--source_lang 'de' is not in the dataset; found languages in the `translation` column: en, fr"),
        ("columns", r"--source_lang 'en' is not in the dataset; found columns \(no `translation` column\): src, tgt"),
        ("no_languages", r"Pass --source_lang and --target_lang"),
        ("csv", r"--train_file must be a JSON lines file \(.json or .jsonl\), got '.*train.csv'"),
        ("no_seq2seq_head", r"is a 'bert' model \(architectures: BertModel\) without a sequence-to-sequence head"),
    ],
)
def test_translate_errors_say_what_was_found(tmp_path, monkeypatch, case, match):
    files = translation_files(tmp_path)
    args = [
        "--train_file",
        files["train"],
        "--source_lang",
        "en",
        "--target_lang",
        "fr",
        "--do_train",
        "--output_dir",
        tmp_path / "out",
        *COMMON,
    ]
    if case == "language":
        args[3] = "de"
    elif case == "columns":
        args[1] = write_jsonl(tmp_path / "flat.jsonl", [{"src": "one", "tgt": "un"}])
    elif case == "no_languages":
        args = args[:2] + args[6:]
    elif case == "csv":
        args[1] = tmp_path / "train.csv"
    else:
        args += ["--model_name_or_path", bert_checkpoint(tmp_path / "bert")]
    with pytest.raises(ValueError, match=match):
        run(translate, monkeypatch, *args)


def translate_parser():
    return HfArgumentParser((translate.ModelArguments, translate.DataTrainingArguments, XSAMSeq2SeqTrainingArguments))


def parse(argv):
    return _common.parse_arguments(
        translate_parser(),
        translate.DATA_AND_MODEL_OPTIONS,
        translate.EMBEDDED_DEFAULTS,
        argv=list(map(str, argv)),
        run_flags=translate.RUN_FLAGS,
    )


def test_embedded_defaults_apply_without_data_or_model_flags_and_yield_to_explicit_ones(tmp_path):
    _, _, args = parse(["--output_dir", tmp_path, "--learning_rate", "0.01"])
    assert args.do_train and args.predict_with_generate and args.num_train_epochs == 3
    assert args.learning_rate == 0.01
    _, _, args = parse(
        [
            "--output_dir",
            tmp_path,
            "--train_file",
            "x.jsonl",
            "--source_lang",
            "en",
            "--target_lang",
            "fr",
            "--do_eval",
        ]
    )
    assert not args.do_train and args.learning_rate == 5e-5 and args.num_train_epochs == 3

    (tmp_path / "a.json").write_text(json.dumps({"output_dir": str(tmp_path), "num_train_epochs": 2}))
    _, _, args = parse([tmp_path / "a.json"])
    assert args.do_train and args.num_train_epochs == 2 and args.learning_rate == 1e-3


# --------------------------------------------------------------------------------------------------
# classify_images.py


def test_random_resized_crop_keeps_size_and_mode():
    image = PILImage.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    cropped = classify_images.random_resized_crop(image, 0.5, random.Random(0))
    assert cropped.size == (8, 8) and cropped.mode == "L"


def test_classify_embedded_run_saves_model_processor_metrics_and_card(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run(
        classify_images,
        monkeypatch,
        "--output_dir",
        out,
        *TINY_VIT,
        *COMMON,
        "--max_train_samples",
        32,
        "--max_eval_samples",
        16,
        "--max_steps",
        2,
        "--eval_strategy",
        "no",
    )
    accuracy = read_json(out / "eval_results.json")["eval_accuracy"]
    assert 0.0 <= accuracy <= 1.0
    card = ModelCard.load(out / "README.md")
    assert {"xsam", "image-classification", "vision"} <= set(card.data.tags)
    assert "| rho | 0.05 |" in card.text and "scikit-learn digits" in card.text
    (result,) = card.data.eval_results  # the accuracy reaches the Hub metadata (model-index)
    assert (result.task_type, result.dataset_type, result.metric_type) == (
        "image-classification",
        "sklearn-digits",
        "accuracy",
    )
    assert result.metric_value == accuracy and result.dataset_split is None  # not the string "None"
    # the embedded default warmup_steps=0.05 is a ratio: ceil(0.05 * 2) = 1 step
    assert "- lr_scheduler_warmup_ratio: 0.05 (1 of the 2 training steps)" in card.text

    model = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    image = PILImage.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    logits = model(**processor(image, return_tensors="pt")).logits
    assert logits.shape == (1, 10) and model.config.id2label[0] == "0"


@pytest.mark.parametrize("sam_method", ["xsam", "none"])
def test_classify_resumed_mid_epoch_ends_as_the_uninterrupted_run(tmp_path, monkeypatch, sam_method):
    """With the default random crops: 4 steps an epoch, a checkpoint at step 3, resumed there, 8 steps in all."""
    flags = [*TINY_VIT, *COMMON, "--max_train_samples", 32, "--max_eval_samples", 8, "--num_train_epochs", 2,
             "--eval_strategy", "no", "--save_strategy", "steps", "--save_steps", 3, "--sam_method", sam_method]  # fmt: skip
    run(classify_images, monkeypatch, "--output_dir", tmp_path / "whole", *flags)
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    run(classify_images, monkeypatch, "--output_dir", tmp_path / "resumed", "--resume_from_checkpoint", checkpoint,
        *flags)  # fmt: skip
    whole, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "resumed"))
    assert read_json(tmp_path / "resumed" / "trainer_state.json")["global_step"] == 8
    assert all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_classify_builds_a_resnet_with_batchnorm_and_trains_it_with_sgd(tmp_path, monkeypatch):
    out = tmp_path / "out"
    resnet = ["--architecture", "resnet", "--resnet_hidden_sizes", "8", "16", "--resnet_depths", "1", "1"]
    sgd = ["--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.05"]
    run(classify_images, monkeypatch, "--output_dir", out, "--image_size", 8, *resnet, *sgd, *COMMON,
        "--max_train_samples", 16, "--max_eval_samples", 8, "--max_steps", 2, "--eval_strategy", "no")  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.model_type == "resnet" and model.config.hidden_sizes == [8, 16]
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert read_json(out / "trainer_state.json")["log_history"][0]["xsam/alpha"] >= 0


def test_classify_trains_with_the_adaptive_ascent_from_its_flags(tmp_path, monkeypatch):
    """``--sam_adaptive true --sam_adaptive_eta 0`` parse into the run's settings; ASAM trains and its card says so."""
    climbs, climb = [], AdaptiveAscent.climb_

    def counted(ascent, *args):
        climbs.append(ascent.eta)
        return climb(ascent, *args)

    monkeypatch.setattr(AdaptiveAscent, "climb_", counted)
    out = tmp_path / "out"
    run(classify_images, monkeypatch, "--output_dir", out, *TINY_VIT, *COMMON, "--max_train_samples", 16,
        "--max_eval_samples", 8, "--max_steps", 2, "--eval_strategy", "no", "--sam_method", "sam", "--rho", 0.5,
        "--sam_adaptive", "true", "--sam_adaptive_eta", 0)  # fmt: skip
    args = torch.load(out / "training_args.bin", weights_only=False)
    assert (args.sam_adaptive, args.sam_adaptive_eta) == (True, 0.0)
    assert climbs == [0.0, 0.0], "one adaptive climb of eta 0 per step"
    logs = [entry for entry in read_json(out / "trainer_state.json")["log_history"] if "xsam/theta" in entry]
    # the ascent moved the weights (a stalled one gives theta 0), though every bias at zero stays there with eta 0
    assert len(logs) == 2 and all(np.isfinite(entry["loss"]) and entry["xsam/theta"] > 0 for entry in logs)
    card = ModelCard.load(out / "README.md")
    assert "asam" in card.data.tags and "| sam_adaptive | True |\n| sam_adaptive_eta | 0 |" in card.text


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--architecture", "cnn"], r"argument --architecture: invalid choice: 'cnn' \(choose from 'vit', 'resnet'\)"),
        (["--architecture", "resnet", "--resnet_depths", "1", "1"],
         r"Invalid --resnet_depths: \[1, 1\]; give one depth per stage of resnet_hidden_sizes \[16, 32, 64\]"),
    ],
)  # fmt: skip
def test_classify_model_flags_are_checked(tmp_path, monkeypatch, flags, match):
    with pytest.raises(ValueError, match=match):
        run(classify_images, monkeypatch, "--output_dir", tmp_path / "out", *flags, *COMMON)


def image_folder(root, classes=("cat", "dog"), per_class=4):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_classify_reports_test_accuracy_with_do_predict(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    features = Features({"img": Image(), "label": ClassLabel(names=["cat", "dog"])})
    for split, n in (("train", 16), ("validation", 8), ("test", 12)):
        images = [PILImage.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(n)]
        Dataset.from_dict({"img": images, "label": [i % 2 for i in range(n)]}, features=features).to_parquet(
            tmp_path / f"{split}.parquet"
        )
    out = tmp_path / "out"
    files = [f"--{split}_file" for split in ("train", "validation", "test")]
    run(
        classify_images,
        monkeypatch,
        *[value for flag in files for value in (flag, tmp_path / f"{flag[2:-5]}.parquet")],
        "--image_column_name",
        "img",
        *TINY_VIT,
        "--do_train",
        "--do_predict",
        "--max_steps",
        2,
        "--output_dir",
        out,
        *COMMON,
    )
    # the accuracy of the saved model on the test file, computed here
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    test = Dataset.from_parquet(str(tmp_path / "test.parquet"))
    with torch.no_grad():
        logits = model(**processor([image.convert("RGB") for image in test["img"]], return_tensors="pt")).logits
    expected = (logits.argmax(-1) == torch.tensor(test["label"])).float().mean().item()
    results = read_json(out / "predict_results.json")
    assert results["predict_samples"] == 12 and results["predict_accuracy"] == pytest.approx(expected)
    assert not (out / "eval_results.json").exists()  # --do_eval not given


def test_classify_fine_tunes_a_checkpoint_on_image_folders_with_a_new_head(tmp_path, monkeypatch):
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "ckpt")
    ViTImageProcessorPil(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "ckpt")
    run(
        classify_images,
        monkeypatch,
        "--model_name_or_path",
        tmp_path / "ckpt",
        "--ignore_mismatched_sizes",
        "--train_dir",
        image_folder(tmp_path / "train"),
        "--validation_dir",
        image_folder(tmp_path / "valid"),
        "--do_train",
        "--do_eval",
        "--max_steps",
        2,
        "--output_dir",
        tmp_path / "out",
        *COMMON,
    )
    assert read_json(tmp_path / "out" / "config.json")["id2label"] == {"0": "cat", "1": "dog"}
    assert "eval_accuracy" in read_json(tmp_path / "out" / "eval_results.json")


def test_classify_reads_image_paths_and_string_labels_from_json_lines(tmp_path, monkeypatch):
    folder = image_folder(tmp_path / "images")
    rows = [{"file": str(path), "animal": path.parent.name} for path in sorted(folder.glob("*/*.png"))]
    run(
        classify_images,
        monkeypatch,
        "--train_file",
        write_jsonl(tmp_path / "train.jsonl", rows),
        "--image_column_name",
        "file",
        "--label_column_name",
        "animal",
        "--train_val_split",
        0.25,
        *TINY_VIT,
        "--do_train",
        "--do_eval",
        "--max_steps",
        1,
        "--output_dir",
        tmp_path / "out",
        *COMMON,
    )
    assert read_json(tmp_path / "out" / "eval_results.json")["eval_samples"] == 2
    assert read_json(tmp_path / "out" / "config.json")["label2id"] == {"cat": 0, "dog": 1}


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--label_column_name", "species"],
         r"--label_column_name 'species' is not a column of the dataset; found columns: image, label, size, caption"),
        (["--image_column_name", "size"], r"--image_column_name 'size' holds Value\('int64'\), not images"),
        (["--image_column_name", "caption"], r"--image_column_name 'caption' holds 'a cat', which is not an image"),
        (["--do_predict"], r"--do_predict needs a 'test' split; the data has train"),
        (["--test_file", "test.csv"], r"--test_file must be a parquet or JSON lines file, got 'test.csv'"),
    ],
)  # fmt: skip
def test_classify_errors_say_what_was_found(tmp_path, monkeypatch, flags, match):
    features = Features(
        {
            "image": Image(),
            "label": ClassLabel(names=["cat", "dog"]),
            "size": Value("int64"),
            "caption": Value("string"),
        }
    )
    images = [PILImage.new("RGB", (8, 8))] * 2
    Dataset.from_dict(
        {"image": images, "label": [0, 1], "size": [8, 8], "caption": ["a cat", "a dog"]}, features=features
    ).to_parquet(tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=match):
        run(
            classify_images,
            monkeypatch,
            "--train_file",
            tmp_path / "train.parquet",
            *flags,
            "--do_train",
            "--output_dir",
            tmp_path / "out",
            *COMMON,
        )


def test_classify_refuses_a_model_without_an_image_classification_head(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"is a 'bert' model without an image-classification head"):
        run(
            classify_images,
            monkeypatch,
            "--model_name_or_path",
            bert_checkpoint(tmp_path / "bert"),
            "--train_dir",
            image_folder(tmp_path / "train"),
            "--do_train",
            "--output_dir",
            tmp_path / "out",
            *COMMON,
        )


# --------------------------------------------------------------------------------------------------
# the Hub


def test_push_failures_say_whether_anything_was_trained_and_where_it_is(tmp_path, monkeypatch, capsys):
    import transformers.trainer

    class Offline:
        def create_repo(self, *args, **kwargs):
            raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(transformers.trainer, "hf_api", Offline)
    with pytest.raises(RuntimeError, match=r"creating the Hub repository failed .*nothing has been trained yet"):
        run(
            classify_images,
            monkeypatch,
            "--output_dir",
            tmp_path / "a",
            *TINY_VIT,
            *COMMON,
            "--max_steps",
            1,
            "--push_to_hub",
        )

    class UploadFails:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"someone/{repo_id}"})()

        def upload_folder(self, **kwargs):
            raise OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(transformers.trainer, "hf_api", UploadFails)
    out = tmp_path / "b"
    flags = ["--output_dir", out, *TINY_VIT, *COMMON, "--max_steps", 1, "--max_eval_samples", 8, "--push_to_hub"]
    monkeypatch.setattr(sys, "argv", ["classify_images.py", *map(str, flags)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        _common.run(classify_images.main)  # as the script runs: one line on stderr, exit status 1
    assert stop.value.code == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert re.fullmatch(
        r"classify_images\.py: error: Pushing to the Hub failed \(OfflineModeIsEnabled: offline mode is enabled\)\. "
        r"The model, .* are saved in .*b; upload them later with `hf upload someone/b .*",
        stderr.strip().splitlines()[-1],
    )
    assert {"model.safetensors", "preprocessor_config.json", "eval_results.json", "README.md"} <= set(os.listdir(out))


# --------------------------------------------------------------------------------------------------
# two processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_cpu_processes_train_together(tmp_path, launcher):
    """translate.py under `accelerate launch` with the shipped CPU config, classify_images.py under `torchrun`: one
    global batch of 2 x 8."""
    port = str(free_port())
    if launcher == "accelerate":
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            SCRIPTS / "accelerate_configs" / "multi_cpu.yaml",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
            str(SCRIPTS / "translate.py"),
            *EMBEDDED_TRANSLATION,
            *TINY_MARIAN,
        ]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            str(SCRIPTS / "classify_images.py"),
            *TINY_VIT,
            "--max_eval_samples",
            16,
        ]
    command += [
        "--output_dir",
        str(tmp_path / "out"),
        *COMMON,
        "--max_train_samples",
        32,
        "--num_train_epochs",
        1,
        "--eval_strategy",
        "no",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert read_json(tmp_path / "out" / "trainer_state.json")["global_step"] == 2  # 32 samples / (2 x 8)
    assert "xsam" in ModelCard.load(tmp_path / "out" / "README.md").data.tags


# --------------------------------------------------------------------------------------------------
# accelerate configs


@pytest.mark.parametrize(
    "name, distributed_type", [("multi_gpu", "MULTI_GPU"), ("multi_cpu", "MULTI_GPU"), ("fsdp2", "FSDP")]
)
def test_accelerate_configs_launch_what_they_say(monkeypatch, name, distributed_type):
    """The environment `accelerate launch --config_file` gives the processes, from accelerate's own parser."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    config = SCRIPTS / "accelerate_configs" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(config), str(SCRIPTS / "translate.py")])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == 2 and (args.use_fsdp if name == "fsdp2" else args.multi_gpu)
    env = prepare_multi_gpu_env(args)
    assert env.get("ACCELERATE_USE_FSDP", "false") == ("true" if distributed_type == "FSDP" else "false")
    if name == "fsdp2":
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert FullyShardedDataParallelPlugin().fsdp_version == 2  # what the Trainer's Accelerator builds
        text = config.read_text()  # the flags XSAM needs with FSDP, which a config file cannot set
        assert "--sam_perturbation global" in text and '"sync_each_batch": true' in text


@pytest.mark.parametrize("script", [classify_images, translate])
def test_default_output_folders_of_the_embedded_runs_are_ignored_by_git(script):
    root = SCRIPTS.parent
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    folder = script.EMBEDDED_DEFAULTS["output_dir"]
    result = subprocess.run(["git", "check-ignore", "-q", f"{folder}/README.md"], cwd=root)
    assert result.returncode == 0, f"{folder}/ is not in .gitignore"


def test_overwrite_output_dir_trains_afresh_into_a_folder_that_would_be_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    (out / "checkpoint-3" / "trainer_state.json").write_text("{}")  # a whole checkpoint: the Trainer writes it last
    args = SimpleNamespace(output_dir=str(out), do_train=True, resume_from_checkpoint=None)
    assert _common.detect_last_checkpoint(args) == str(out / "checkpoint-3")  # resumed by default
    assert _common.detect_last_checkpoint(args, overwrite_output_dir=True) is None
    shutil.rmtree(out / "checkpoint-3")
    (out / "model.safetensors").write_text("")
    with pytest.raises(_common.UsageError, match="Pass --overwrite_output_dir to train into it anyway"):
        _common.detect_last_checkpoint(args)
    assert _common.detect_last_checkpoint(args, overwrite_output_dir=True) is None
    # the flag is parsed with the scripts' other arguments
    parser = HfArgumentParser((*translate_parser().dataclass_types, _common.OutputDirArguments))
    parsed = _common.parse_arguments(parser, translate.DATA_AND_MODEL_OPTIONS, translate.EMBEDDED_DEFAULTS,
                                     argv=["--output_dir", str(out), "--overwrite_output_dir"])  # fmt: skip
    assert parsed[-1].overwrite_output_dir
