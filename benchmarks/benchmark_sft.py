#!/usr/bin/env python
"""Step cost and memory of XSAM with TRL's SFTTrainer and LoRA, against SAM and the base optimizer.

A small Llama built from a config, LoRA adapters on its attention and MLP projections, gradient checkpointing
on (SFTConfig's default), one batch of random token sequences (loss on every token). Each configuration gets
its own `XSAMSFTTrainer` over its own copy of the model; after warm-up the configurations run interleaved in a
fresh random order every round, and each ratio is the median of per-round ratios (see ``benchmark.py``). One
unit is one optimizer step: ``training_step``, clipping, ``optimizer.step``, ``zero_grad``.

``xsam-nosearch`` searches alpha on its first (warm-up) step only; ``xsam-search`` searches on every step, and its
excess over ``xsam-nosearch`` is the cost of one search (the paper searches once per epoch).

Memory: the bytes of the engine's saved copy against those of the trainable (LoRA) parameters and of the
whole model, and the bytes of live tensors each configuration adds by its first steps (optimizer state, saved
copy), against the base optimizer's.

Usage:
    python benchmarks/benchmark_sft.py --rounds 30 --json outputs/benchmark_sft.json

Produces: docs/sft.md (step cost and memory with SFT and LoRA).
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from benchmark import Clock, live_tensor_bytes, paired_ratio
from hf_xsam import XSAMSFTConfig, XSAMSFTTrainer

NEVER = 10**9
CONFIGS = {
    "none": {"sam_method": "none"},
    "sam": {"sam_method": "sam"},
    "xsam-nosearch": {"sam_method": "xsam", "alpha_search_interval": NEVER},
    "xsam-search": {"sam_method": "xsam", "alpha_search_interval": 1},
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(vocab: int, hidden: int, layers: int, seq: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=seq,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def make_trainer(model, name: str, output_dir: str, lora_r: int) -> XSAMSFTTrainer:
    args = XSAMSFTConfig(
        output_dir=output_dir,
        report_to="none",
        learning_rate=1e-4,
        bf16=False,
        use_cpu=True,
        rho=0.05,
        max_steps=NEVER,
        **CONFIGS[name],
    )
    # SFTTrainer wants a dataset and a tokenizer to prepare it with; the timed batch is made in main()
    data = Dataset.from_dict({"input_ids": [[1, 2, 3]]})
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")), pad_token="<pad>", eos_token="<pad>"
    )
    trainer = XSAMSFTTrainer(
        model=copy.deepcopy(model),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=LORA_TARGETS),
    )
    trainer.model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
    trainer.model.enable_input_require_grads()
    trainer.create_optimizer_and_scheduler(num_training_steps=NEVER)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which is not run here
    return trainer


def unit(trainer: XSAMSFTTrainer, batch: dict[str, torch.Tensor]) -> None:
    model = trainer.model
    trainer.training_step(model, dict(batch))
    trainer.accelerator.clip_grad_norm_(model.parameters(), trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad()
    trainer.state.global_step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (the ratios come with quartiles), got {args.rounds}")
    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()

    model = build_model(args.vocab, args.hidden, args.layers, args.seq)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.seq), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(model, name, tmp, args.lora_r) for name in CONFIGS}
        clock = Clock(torch.device("cpu"), "cpu")
        memory = {}
        for name, trainer in trainers.items():
            before = live_tensor_bytes(trainer)
            for _ in range(args.warmup):
                unit(trainer, batch)
            # what the configuration keeps between steps: optimizer state, and the saved copy for SAM and XSAM
            memory[name] = live_tensor_bytes(trainer) - before
        times: dict[str, list[float]] = defaultdict(list)
        order = random.Random(args.seed)
        names = list(trainers)
        for _ in range(args.rounds):
            order.shuffle(names)
            for name in names:
                times[name].append(clock(lambda: unit(trainers[name], batch)))
        engine = trainers["xsam-nosearch"].xsam
        peft_model = trainers["xsam-nosearch"].model
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        sizes = {
            "model_parameters": sum(p.numel() for p in peft_model.parameters()),
            "trainable_parameters": sum(p.numel() for p in trainable),
            "xsam_saved_copy_elements": engine.buffer_elements()["saved"],
            "xsam_saved_copy_bytes": sum(buffer.nbytes for buffer in engine.saved_weights()),
            "trainable_bytes": sum(p.nbytes for p in trainable),
        }
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        f"{a}/{b}": paired_ratio(times, a, b)
        for a, b in (
            ("sam", "none"),
            ("xsam-nosearch", "none"),
            ("xsam-nosearch", "sam"),
            ("xsam-search", "xsam-nosearch"),
        )
    }
    live = {name: value - memory["none"] for name, value in memory.items()}
    result = {
        "settings": vars(args) | {"json": str(args.json)},
        "median_s": medians,
        "ratios": ratios,
        "sizes": sizes,
        "live_tensor_bytes_over_none": live,
    }
    print(
        f"Llama {args.layers}x{args.hidden}, vocab {args.vocab}, batch {args.batch}x{args.seq}, "
        f"LoRA r={args.lora_r}, "
        f"gradient checkpointing, CPU {args.threads} thread(s), {args.rounds} rounds"
    )
    for name, value in medians.items():
        print(f"  {name:12s} {1e3 * value:8.1f} ms/step")
    for key, (median, q1, q3) in ratios.items():
        print(f"  {key:18s} {median:.3f} (IQR {q1:.3f}-{q3:.3f})")
    print(
        f"  parameters {sizes['model_parameters']:,}; trainable (LoRA) {sizes['trainable_parameters']:,}; "
        f"XSAM saved copy {sizes['xsam_saved_copy_elements']:,} elements ({sizes['xsam_saved_copy_bytes']:,} bytes)"
    )
    print("  live tensor bytes kept between steps, over none's: " + ", ".join(f"{k} {v:,}" for k, v in live.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
