"""XSAMDPOTrainer: XSAM steps on DPO's loss, the reference model's passes, first-pass metrics, the card, flags."""

import copy
import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import SequentialSampler
from transformers import HfArgumentParser, PreTrainedTokenizerFast, TrainingArguments
from trl import DPOConfig, DPOTrainer, TrlParser

from helpers import tiny_llama, training_args
from hf_xsam import XSAMConfig, XSAMDPOConfig, XSAMDPOTrainer

ROOT = Path(__file__).parent.parent

BATCH = 4
NUMBERS = ["one", "two", "three", "four", "five", "six"]
# (a, b): the prompt "a plus b is", the right sum chosen, the sum one too high rejected
SUMS = [(1, 1), (2, 2), (1, 2), (2, 1), (1, 3), (3, 1), (2, 3), (1, 4)]
XSAM_FIELDS = {field.name for field in fields(XSAMConfig)}


def preference_pairs():
    return Dataset.from_dict(
        {
            "prompt": [f"{NUMBERS[a - 1]} plus {NUMBERS[b - 1]} is" for a, b in SUMS],
            "chosen": [f" {NUMBERS[a + b - 1]}" for a, b in SUMS],
            "rejected": [f" {NUMBERS[a + b]}" for a, b in SUMS],
        }
    )


def word_tokenizer():
    vocab = {word: i for i, word in enumerate(["<pad>", "</s>", "plus", "is", *NUMBERS])}
    words = Tokenizer(models.WordLevel(vocab, "<pad>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>")


def dpo_args(tmp_path, args_class=XSAMDPOConfig, **overrides):
    settings = dict(
        per_device_train_batch_size=BATCH,
        max_steps=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        gradient_checkpointing=False,
        seed=3,
        rho=0.5,
        alpha_search_interval=1,
    )
    settings.update(overrides)
    if args_class is DPOConfig:  # TRL's own, without the XSAM settings; its bf16 default would autocast on CPU
        settings = {name: value for name, value in settings.items() if name not in XSAM_FIELDS}
        settings.setdefault("bf16", False)
    return training_args(tmp_path, args_class=args_class, **settings)


class SequentialDPOTrainer(XSAMDPOTrainer):
    """Feeds the pairs in dataset order, so that two runs see the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


class CountForwards:
    """Counts the forward calls of a module."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_hook(self.hook)

    def hook(self, *args):
        self.count += 1


def make_trainer(tmp_path, trainer_class=XSAMDPOTrainer, reference="copy", peft_config=None, **overrides):
    """A trainer on the embedded pairs; ``reference`` "copy" passes a copy of the model as the reference model,
    None leaves it to TRL (the model with its adapters off under LoRA, or precomputed log-probabilities)."""
    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer, max_positions=32)
    args_class = DPOConfig if trainer_class is DPOTrainer else XSAMDPOConfig
    return trainer_class(
        model=model,
        ref_model=copy.deepcopy(model) if reference == "copy" else None,
        args=dpo_args(tmp_path, args_class, **overrides),
        train_dataset=preference_pairs(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def train_logs(trainer):
    return [log for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("reference", ["copy", "lora"])
def test_dpo_steps_are_xsam_steps_and_the_reference_stays_put(tmp_path, reference):
    """At the start the policy is the reference, so DPO's loss is log 2 exactly; the ascent point is another policy
    against the same reference, so its loss is above log 2 (were the reference perturbed with it, it would be log 2).
    """
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = make_trainer(
        tmp_path,
        reference=reference if reference == "copy" else None,
        peft_config=lora if reference == "lora" else None,
    )
    reference_model = trainer.ref_model if reference == "copy" else trainer.model.get_base_model()
    frozen = {name: p.detach().clone() for name, p in reference_model.named_parameters() if "lora_" not in name}
    trained = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = train_logs(trainer)
    assert [log["xsam/passes"] for log in logs] == [2.0, 2.0]  # k + 1 forward-backward passes, k = 1
    assert len(trainer.xsam.search_history) == 2 and all(log["xsam/search_forwards"] > 0 for log in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert logs[0]["xsam/ascent_loss"] > math.log(2) + 1e-3 and logs[0]["xsam/sharpness"] > 1e-3
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(trained[name], after[name]) for name in trained)
    reference_after = dict(reference_model.named_parameters())
    assert all(torch.equal(frozen[name], reference_after[name]) for name in frozen)
    assert {"xsam", "sharpness-aware-minimization", "trl", "dpo"} <= set(trainer.model.model_tags)


def test_dpo_metrics_count_only_the_first_pass(tmp_path):
    """Ascent passes and an alpha search on every step leave DPO's rewards, log-probabilities and token count as
    the first pass left them: the first step starts from the weights of a plain run, so it logs the same figures."""
    plain = make_trainer(tmp_path / "none", SequentialDPOTrainer, sam_method="none")
    plain.train()
    trainer = make_trainer(tmp_path / "xsam", SequentialDPOTrainer, ascent_steps=2)
    trainer.train()
    logs, plain_logs = train_logs(trainer), train_logs(plain)
    assert [log["num_tokens"] for log in logs] == [log["num_tokens"] for log in plain_logs]
    assert logs[0]["num_tokens"] > 0 and logs[1]["num_tokens"] == 2 * logs[0]["num_tokens"]
    for key in ("logps/chosen", "logps/rejected", "logits/chosen", "entropy", "mean_token_accuracy"):
        assert logs[0][key] == pytest.approx(plain_logs[0][key], rel=1e-6), key
    assert logs[1]["logps/chosen"] != pytest.approx(plain_logs[1]["logps/chosen"], rel=1e-6)  # the runs part


def test_plain_dpo_steps_equal_dpo_trainer_in_one_pass(tmp_path):
    """sam_method="none": TRL's DPOTrainer, weight for weight, with one forward of the policy and one of the reference
    per step."""
    steps = 3
    trainer = make_trainer(tmp_path / "none", sam_method="none", max_steps=steps)
    policy, reference = CountForwards(trainer.model), CountForwards(trainer.ref_model)
    trainer.train()
    baseline = make_trainer(tmp_path / "dpo", DPOTrainer, max_steps=steps)
    baseline.train()
    assert (policy.count, reference.count) == (steps, steps)
    assert trainer.xsam is None and not any(key.startswith("xsam/") for log in train_logs(trainer) for key in log)
    for (name, p), q in zip(baseline.model.named_parameters(), trainer.model.parameters()):
        assert torch.equal(p, q), name


def test_reference_runs_on_every_pass_unless_precomputed(tmp_path):
    """DPO's loss runs the reference model on each call: once per forward-backward pass and per search forward.
    With precompute_ref_log_probs it runs before training only, and the steps are the same."""
    fixed_alpha = dict(alpha_search_interval=0, alpha=1.5, max_steps=3)
    trainer = make_trainer(tmp_path / "each", **fixed_alpha)
    per_pass = CountForwards(trainer.ref_model)
    trainer.train()
    assert per_pass.count == 3 * 2  # two passes per step, no search

    searching = make_trainer(tmp_path / "search", max_steps=2)
    counted = CountForwards(searching.ref_model)
    searching.train()
    logs = train_logs(searching)
    assert counted.count == sum(log["xsam/passes"] + log["xsam/search_forwards"] for log in logs)

    tokenizer = word_tokenizer()
    model = tiny_llama(tokenizer, max_positions=32)
    reference_model = copy.deepcopy(model)
    before_training = CountForwards(reference_model)
    precomputed = XSAMDPOTrainer(
        model=model,
        ref_model=reference_model,
        args=dpo_args(tmp_path / "precomputed", precompute_ref_log_probs=True, **fixed_alpha),
        train_dataset=preference_pairs(),
        processing_class=tokenizer,
    )
    assert before_training.count == len(SUMS) // BATCH
    precomputed.train()
    assert before_training.count == len(SUMS) // BATCH
    for (name, p), q in zip(trainer.model.named_parameters(), precomputed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", ["xsam", "none"])
def test_card_is_the_trainers_with_dpo_and_xsam(tmp_path, method):
    trainer = make_trainer(tmp_path, sam_method=method, save_strategy="steps", save_steps=2)
    trainer.train()
    # TRL writes the card at every checkpoint (DPOTrainer._save_checkpoint); it is the XSAM card there too
    assert "hf_xsam" in ModelCard.load(tmp_path / "README.md").text
    trainer.create_model_card(model_name="tiny-dpo", dataset_name="number-pairs")
    card = ModelCard.load(tmp_path / "README.md")
    assert {"trl", "dpo"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "on the number-pairs dataset" in card.text and "### Training hyperparameters" in card.text
    assert "Quick start" not in card.text and "Direct Preference Optimization" not in card.text  # TRL's card
    if method == "xsam":
        assert {"xsam", "sharpness-aware-minimization"} <= set(card.data.tags)
        assert "## Training with XSAM" in card.text and "| rho | 0.5 |" in card.text
        assert "Cost: 2 forward-backward passes" in card.text
    else:
        assert "xsam" not in card.data.tags and "plain training" in card.text


def test_arguments_by_position_by_name_or_the_default(tmp_path, monkeypatch):
    tokenizer = word_tokenizer()
    model, data = tiny_llama(tokenizer, max_positions=32), preference_pairs()
    args = dpo_args(tmp_path)
    # DPOTrainer(model, ref_model, args, data_collator, train_dataset, ...)
    trainer = XSAMDPOTrainer(model, copy.deepcopy(model), args, None, data, processing_class=tokenizer)
    assert trainer.args is args
    monkeypatch.chdir(tmp_path)
    trainer = XSAMDPOTrainer(model, copy.deepcopy(model), train_dataset=data, processing_class=tokenizer)
    assert type(trainer.args) is XSAMDPOConfig and trainer.args.output_dir == "trainer_output"
    plain = DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    with pytest.raises(TypeError, match="XSAMDPOTrainer needs XSAMDPOConfig .* got DPOConfig"):
        XSAMDPOTrainer(model, copy.deepcopy(model), plain, train_dataset=data, processing_class=tokenizer)


@pytest.mark.parametrize("parser_class", [HfArgumentParser, TrlParser])
def test_config_flags_parse(tmp_path, parser_class):
    flags = ["--output_dir", str(tmp_path), "--sam_method", "sam", "--rho", "0.02", "--beta", "0.3"]
    (args,) = parser_class(XSAMDPOConfig).parse_args_into_dataclasses(
        [*flags, "--precompute_ref_log_probs", "true", "--bf16", "false", "--use_cpu", "true"]
    )
    assert isinstance(args, TrainingArguments)
    assert (args.sam_method, args.rho, args.beta, args.precompute_ref_log_probs) == ("sam", 0.02, 0.3, True)
    with pytest.raises(ValueError, match="Invalid rho: -1.0"):
        parser_class(XSAMDPOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--rho", "-1", "--bf16", "false", "--use_cpu", "true"]
        )


def test_the_example_of_docs_dpo_runs(tmp_path, monkeypatch):
    example = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "dpo.md").read_text(), re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "docs/dpo.md example", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.ref_model is None and trainer.state.global_step == 4
    assert [log["xsam/passes"] for log in train_logs(trainer)] == [2.0] * 4
    card = ModelCard.load(tmp_path / "dpo-xsam" / "README.md")
    assert {"trl", "dpo", "xsam"} <= set(card.data.tags) and "## Training with XSAM" in card.text
