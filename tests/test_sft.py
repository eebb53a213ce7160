"""XSAMSFTTrainer: SFT's metrics see only the first pass, LoRA, gradient checkpointing, resume, tags, flags."""

import json
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from num2words import num2words
from peft import LoraConfig
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import SequentialSampler
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    PreTrainedTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)
from trl import SFTConfig, TrlParser

from helpers import tiny_llama, training_args
from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer, XSAMTrainer, XSAMTrainingArguments
from hf_xsam.state import STATE_NAME

BATCH = 4


def instructions(n=16):
    numbers = [3, 17, 42, 105, 999, 1234, 20, 61, 7, 88, 300, 4500, 12, 76, 58, 2026][:n]
    return Dataset.from_dict(
        {"prompt": [f"write {x} in words:" for x in numbers], "completion": [f" {num2words(x)}" for x in numbers]}
    )


def train_tokenizer(data):
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    texts = list(data["prompt"]) + list(data["completion"])
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def sft_args(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=BATCH,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        bf16=False,
        seed=3,
        rho=0.5,
        alpha_search_interval=1,
    )
    settings.update(overrides)
    return training_args(tmp_path, args_class=XSAMSFTConfig, **settings)


class SequentialSFTTrainer(XSAMSFTTrainer):
    """Feeds batches in dataset order, so that a test knows which examples each step saw."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def make_trainer(tmp_path, trainer_class=XSAMSFTTrainer, peft_config=None, seed=0, **overrides):
    data = instructions()
    tokenizer = train_tokenizer(data)
    return trainer_class(
        model=tiny_llama(tokenizer, seed),
        args=sft_args(tmp_path, **overrides),
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


class MetricsAtStepStart(TrainerCallback):
    """Entropy and token accuracy of the step's micro-batches at the weights the step starts from, computed here
    (averaged over the micro-batches, as SFTTrainer averages what it records)."""

    def __init__(self, trainer):
        self.trainer, self.values = trainer, []

    @torch.no_grad()
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        micro_batches = args.gradient_accumulation_steps
        values = []
        for micro in range(micro_batches):
            start = (state.global_step * micro_batches + micro) * BATCH
            batch = self.trainer.data_collator([self.trainer.train_dataset[i] for i in range(start, start + BATCH)])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            valid = labels != -100
            log_probs = logits.log_softmax(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            correct = logits.argmax(-1) == labels
            values.append((entropy[valid].mean().item(), correct[valid].float().mean().item()))
        self.values.append(tuple(sum(v) / micro_batches for v in zip(*values)))


@pytest.mark.parametrize("ascent_steps, accumulation", [(2, 1), (1, 2)])
def test_sft_metrics_count_only_the_first_pass(tmp_path, ascent_steps, accumulation):
    """Ascent passes and an alpha search every step leave num_tokens, entropy and accuracy untouched."""
    settings = dict(gradient_accumulation_steps=accumulation, max_steps=6 // (2 * accumulation) + 1)
    plain = make_trainer(tmp_path / "none", SequentialSFTTrainer, sam_method="none", **settings)
    plain.train()
    trainer = make_trainer(
        tmp_path / "xsam", SequentialSFTTrainer, ascent_steps=ascent_steps, completion_only_loss=True, **settings
    )
    expected = MetricsAtStepStart(trainer)
    trainer.add_callback(expected)
    trainer.train()
    logs, plain_logs = train_logs(trainer), train_logs(plain)
    assert len(logs) == len(expected.values) == settings["max_steps"]
    assert [log["num_tokens"] for log in logs] == [log["num_tokens"] for log in plain_logs]
    assert [log["num_tokens"] for log in logs] == sorted({log["num_tokens"] for log in logs})  # it grows
    for log, (entropy, accuracy) in zip(logs, expected.values):
        assert log["entropy"] == pytest.approx(entropy, rel=1e-5)
        assert log["mean_token_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    # the first steps start from the same weights in both runs
    assert logs[0]["entropy"] == pytest.approx(plain_logs[0]["entropy"], rel=1e-6)
    assert len(trainer.xsam.search_history) == settings["max_steps"]


def lora():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def test_lora_moves_only_the_adapters_and_keeps_one_copy_of_them(tmp_path):
    trainer = make_trainer(tmp_path, peft_config=lora(), max_steps=2)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.args.gradient_checkpointing and trainer.model.get_base_model().is_gradient_checkpointing
    after = dict(trainer.model.named_parameters())
    adapters = {name for name in before if "lora_" in name}
    assert adapters and all(after[name].requires_grad for name in adapters)
    assert all(torch.equal(before[name], after[name]) for name in before if name not in adapters)
    assert any(not torch.equal(before[name], after[name]) for name in adapters if "lora_B" in name)
    saved = trainer.xsam.buffer_elements()["saved"]
    assert saved == sum(after[name].numel() for name in adapters)
    assert {"xsam", "sharpness-aware-minimization", "sft", "trl"} <= set(trainer.model.model_tags)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    runs = []
    for checkpointing in (True, False):
        trainer = make_trainer(tmp_path / str(checkpointing), peft_config=lora(), gradient_checkpointing=checkpointing)
        trainer.train()
        assert trainer.model.get_base_model().is_gradient_checkpointing == checkpointing
        runs.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n})
        runs[-1]["alpha"] = torch.tensor(trainer.xsam.alpha)
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_steps_like_fp32(tmp_path):
    """bf16 autocast (SFTConfig's default where the hardware has it) moves the adapters as fp32 does, roughly.

    SGD and a fixed alpha: Adam's normalisation and a search that picks another alpha would hide the comparison.
    """
    moves = []
    for bf16 in (True, False):
        trainer = make_trainer(
            tmp_path / str(bf16),
            peft_config=lora(),
            bf16=bf16,
            rho=0.05,
            alpha=1.5,
            alpha_search_interval=0,
            optim="sgd",
            learning_rate=0.5,
        )
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
        trainer.train()
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        end = dict(trainer.model.named_parameters())
        moves.append(torch.cat([(end[n] - start[n]).reshape(-1) for n in start]))
    assert moves[0].isfinite().all() and moves[0].norm() > 0
    assert torch.nn.functional.cosine_similarity(moves[0], moves[1], dim=0) > 0.95


def test_resume_equals_an_uninterrupted_run(tmp_path):
    settings = dict(max_steps=4, alpha_search_interval=2, save_strategy="steps", save_steps=2)
    full = make_trainer(tmp_path / "full", **settings)
    full.train()
    interrupted = make_trainer(tmp_path / "resumed", **settings)
    interrupted.train()  # writes checkpoint-2 as the run above did
    resumed = make_trainer(tmp_path / "resumed", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    assert (tmp_path / "resumed" / "checkpoint-2" / STATE_NAME).is_file()
    assert resumed.xsam.search_history == full.xsam.search_history
    for (name, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_every_xsam_trainer_tags_its_model(tmp_path):
    tokenizer = train_tokenizer(instructions())
    model = tiny_llama(tokenizer)
    args = XSAMTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, label_names=["labels"])
    XSAMTrainer(model=model, args=args)
    assert model.model_tags == ["xsam", "sharpness-aware-minimization"]


def test_plain_sft_config_is_refused_with_the_class_to_use(tmp_path):
    data = instructions()
    tokenizer = train_tokenizer(data)
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    with pytest.raises(TypeError, match="XSAMSFTTrainer needs XSAMSFTConfig .* got SFTConfig"):
        XSAMSFTTrainer(model=tiny_llama(tokenizer), args=args, train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("parser_class", [HfArgumentParser, TrlParser])
def test_config_flags_parse(tmp_path, parser_class):
    (args,) = parser_class(XSAMSFTConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--sam_method",
            "sam",
            "--rho",
            "0.02",
            "--ascent_steps",
            "2",
            "--packing",
            "true",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
        ]
    )
    assert isinstance(args, TrainingArguments)
    settings = (args.sam_method, args.rho, args.ascent_steps, args.packing, args.search_radius)
    assert settings == ("sam", 0.02, 2, True, 0.04)
    with pytest.raises(ValueError, match="Invalid rho: -1.0"):
        parser_class(XSAMSFTConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--rho", "-1", "--bf16", "false", "--use_cpu", "true"]
        )


def test_packing_runs_and_counts_tokens_once(tmp_path):
    data = instructions()
    tokenizer = train_tokenizer(data)
    text = Dataset.from_dict({"text": [p + c for p, c in zip(list(data["prompt"]), list(data["completion"]))]})
    counts = []
    for method in ("none", "xsam"):
        args = sft_args(tmp_path / method, sam_method=method, packing=True, max_length=32, max_steps=2)
        trainer = XSAMSFTTrainer(
            model=tiny_llama(tokenizer), args=args, train_dataset=text, processing_class=tokenizer
        )
        trainer.train()
        counts.append([log["num_tokens"] for log in train_logs(trainer)])
    assert counts[0] == counts[1] and counts[0][0] > 0


def test_hf_xsam_imports_without_trl():
    code = (
        "import sys; sys.modules['trl'] = None\n"
        "import hf_xsam\n"
        "from hf_xsam import *\n"
        "assert not {'XSAMSFTTrainer', 'XSAMDPOTrainer'} & set(hf_xsam.__all__)\n"
        "for name in ('XSAMSFTTrainer', 'XSAMDPOConfig'):\n"
        "    try:\n        getattr(hf_xsam, name)\n    except ImportError as err:\n        print(err)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == [
        f"{name} needs TRL: `pip install hf_xsam[trl]` (or `pip install trl`)"
        for name in ("XSAMSFTTrainer", "XSAMDPOConfig")
    ]


# --------------------------------------------------------------------------------------------------
# scripts/sft.py

TINY_LLAMA = [
    "--hidden_size",
    "16",
    "--intermediate_size",
    "32",
    "--num_layers",
    "1",
    "--num_heads",
    "2",
    "--vocab_size",
    "120",
]
QUIET = ["--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1"]


def run_script(monkeypatch, *args):
    import sft

    monkeypatch.setattr(sys, "argv", ["sft.py", *map(str, args)])
    sft.main()


def test_script_embedded_run_trains_evaluates_and_writes_the_card(tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_script(
        monkeypatch,
        "--output_dir",
        out,
        "--num_embedded_train",
        48,
        "--num_embedded_eval",
        8,
        "--max_steps",
        3,
        "--alpha_search_interval",
        2,
        *TINY_LLAMA,
        *QUIET,
    )
    metrics = json.loads((out / "eval_results.json").read_text())
    assert {"eval_exact_match", "eval_mean_token_accuracy", "eval_loss"} <= metrics.keys()
    assert 0.0 <= metrics["eval_exact_match"] <= 1.0 and metrics["eval_samples"] == 8
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [log["xsam/alpha"] for log in state["log_history"] if "loss" in log]
    card = ModelCard.load(out / "README.md")
    assert {"xsam", "sharpness-aware-minimization", "sft", "trl"} <= set(card.data.tags)
    assert "| alpha_search_interval | 2 |" in card.text
    assert "trained from scratch" in card.text and card.data.base_model is None
    assert "None" not in card.text.split("## Training with XSAM")[0] and "licence" not in card.content
    # the exact match and the token accuracy reach the Hub metadata (model-index); the token count does not
    results = {result.metric_type: result for result in card.data.eval_results}
    assert results.keys() == {"exact_match", "mean_token_accuracy"} and "Num Tokens" not in card.text
    result = results["exact_match"]
    assert (result.task_type, result.dataset_type) == ("text-generation", "num2words-instructions")
    assert result.metric_value == metrics["eval_exact_match"]
    assert (
        AutoTokenizer.from_pretrained(out).decode(AutoTokenizer.from_pretrained(out)("write 3,482")["input_ids"])
        == "write 3,482"
    )


def test_script_fine_tunes_a_checkpoint_with_lora_on_json_lines(tmp_path, monkeypatch):
    data = instructions()
    tokenizer = train_tokenizer(data)
    tiny_llama(tokenizer).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    for split, rows in (("train", data), ("valid", data.select(range(4)))):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    run_script(
        monkeypatch,
        "--model_name_or_path",
        tmp_path / "ckpt",
        "--train_file",
        tmp_path / "train.jsonl",
        "--validation_file",
        tmp_path / "valid.jsonl",
        "--do_train",
        "--do_eval",
        "--use_peft",
        "--lora_r",
        4,
        "--lora_target_modules",
        "q_proj",
        "v_proj",
        "--max_steps",
        2,
        "--sam_method",
        "sam",
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        "--output_dir",
        tmp_path / "out",
        *QUIET,
    )
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "eval_exact_match" in json.loads((tmp_path / "out" / "eval_results.json").read_text())
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "| sam_method | sam |" in card.text
    assert card.data.base_model == str(tmp_path / "ckpt")  # the model it was fine-tuned from


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_script_trains_on_chat_json_lines_and_refuses_them_without_a_chat_template(tmp_path, monkeypatch):
    data = instructions()
    chats = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]}
        for p, c in zip(list(data["prompt"]), list(data["completion"]))
    ]
    for name, rows in (("train", chats), ("valid", chats[:4])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    files = [
        "--train_file",
        tmp_path / "train.jsonl",
        "--validation_file",
        tmp_path / "valid.jsonl",
        "--do_train",
        "--do_eval",
        "--max_steps",
        2,
        "--bf16",
        "false",
        "--use_cpu",
        "true",
        *QUIET,
    ]
    with pytest.raises(ValueError, match="Chat data needs a tokenizer with a chat template"):
        run_script(monkeypatch, *files, "--output_dir", tmp_path / "scratch", *TINY_LLAMA)
    tokenizer = train_tokenizer(data)
    tokenizer.chat_template = CHAT_TEMPLATE
    tiny_llama(tokenizer).save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    run_script(monkeypatch, "--model_name_or_path", tmp_path / "ckpt", *files, "--output_dir", tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert "eval_mean_token_accuracy" in metrics and "eval_exact_match" not in metrics
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert [log["num_tokens"] for log in state["log_history"] if "loss" in log][-1] > 0
