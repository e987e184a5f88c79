"""Pretrain a small ViT from its config with FOP through FOPTrainer: the whole recipe.

python examples/vit_pretraining.py                   # scikit-learn digits, offline, ~20 s
python examples/vit_pretraining.py --max_steps 10    # a smoke run
"""

from __future__ import annotations

import argparse

from hf_fop_trainer.data import digits_dataset, image_transform
from transformers import ViTConfig, ViTForImageClassification

from hf_fop import FOPTrainer, FOPTrainingArguments


def main(max_steps: int = -1, output_dir: str = "outputs/vit_pretraining") -> dict[str, float]:
    splits = digits_dataset().train_test_split(test_size=0.2, seed=0, stratify_by_column="label")
    for split in splits.values():
        split.set_transform(image_transform("image", "label", size=16, channels=1))

    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    args = FOPTrainingArguments(
        output_dir=output_dir,
        optim="fop",  # the one line: "kfac" gives the K-FAC baseline, "adamw_torch" AdamW
        learning_rate=1e-3,  # the AdamW learning rate: FOP's steps take AdamW's size
        num_train_epochs=12,
        max_steps=max_steps,
        per_device_train_batch_size=64,
        lr_scheduler_type="constant",
        eval_strategy="epoch" if max_steps < 0 else "no",
        logging_strategy="epoch",
        save_strategy="no",
        remove_unused_columns=False,  # the transform reads the raw columns
        report_to="none",
        use_cpu=True,
    )
    trainer = FOPTrainer(
        model=ViTForImageClassification(config),
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["test"],
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
    parser.add_argument("--max_steps", type=int, default=-1)
    main(**vars(parser.parse_args()))
