"""FOP in the stock transformers Trainer, without FOPTrainer: pass the factory.

    python examples/plain_trainer.py

`optimizer_cls_and_kwargs=(FOPFactory, {...})` works on every supported transformers release
("model" in the kwargs serves releases older than 5.2, which call the class itself).
"""

from __future__ import annotations

import argparse

from hf_fop_trainer.data import digits_dataset, image_transform
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

from hf_fop import FOPFactory


def main(max_steps: int = 300, output_dir: str = "outputs/plain_trainer") -> dict[str, float]:
    splits = digits_dataset().train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    for split in splits.values():
        split.set_transform(image_transform("image", "label", size=16, channels=1))
    model = ViTForImageClassification(
        ViTConfig(
            image_size=16,
            patch_size=4,
            num_channels=1,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
    )
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=64,
        lr_scheduler_type="constant",
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
    )
    fop_settings = {"model": model, "lr": 1e-3}  # an AdamW learning rate
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
        optimizer_cls_and_kwargs=(FOPFactory, fop_settings),
        compute_metrics=lambda p: {
            "accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())
        },
    )
    trainer.train()
    metrics = trainer.evaluate()
    print(f"test accuracy {metrics['eval_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--max_steps", type=int, default=300)
    main(**vars(parser.parse_args()))
