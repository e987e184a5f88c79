"""Command-line trainer: image or text classification with FOP, K-FAC, AdamW or SGD.

    python -m hf_fop_trainer.train --optim fop --output_dir outputs/vit        # ViT on digits
    python -m hf_fop_trainer.train --task text --optim fop --use_peft ...      # MiniLM + LoRA
    accelerate launch --config_file trainer/accelerate/cpu_2proc.yaml -m hf_fop_trainer.train ...
    accelerate launch --config_file trainer/accelerate/fsdp2_cpu_2proc.yaml -m hf_fop_trainer.train

Any `--dataset_name` that `datasets` loads, an imagefolder (`--train_dir`), CSV/JSON files
(`--train_file`), or the embedded offline defaults. Every TrainingArguments flag works, plus
FOP's `--fop_*` flags.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hf_fop_trainer.arguments import DataArguments, ModelArguments
from hf_fop_trainer.cpu_fsdp import allow_fsdp_on_cpu
from hf_fop_trainer.data import (
    IMAGE_COLUMNS,
    LABEL_COLUMNS,
    TEXT_COLUMNS,
    class_counts,
    find_column,
    image_transform,
    load_splits,
    long_tailed,
)
from hf_fop_trainer.metrics import load_metric
from hf_fop_trainer.models import add_lora, build_image_model, build_text_model
from transformers import HfArgumentParser, TrainerCallback, default_data_collator, set_seed

from hf_fop.integration import FOPTrainer, FOPTrainingArguments

logger = logging.getLogger("hf_fop_trainer")


@dataclass
class RunResult:
    metrics: dict[str, float]
    trainer: FOPTrainer


# Defaults for the embedded data; any flag given on the command line wins. FOP and K-FAC graft
# their steps onto AdamW's size, so they take AdamW's learning rate; only SGD needs its own.
IMAGE_DEFAULTS = {
    "--num_train_epochs": "20",
    "--per_device_train_batch_size": "64",
    "--eval_strategy": "epoch",
    "--logging_strategy": "epoch",
    "--lr_scheduler_type": "constant",
}
TEXT_DEFAULTS = {
    "--num_train_epochs": "1",
    "--per_device_train_batch_size": "32",
    "--eval_strategy": "epoch",
}
ADAMW_LEARNING_RATES = {"image": "0.001", "text": "5e-5", "text+peft": "5e-4"}
SGD_LEARNING_RATES = {"image": "0.1", "text": "0.01", "text+peft": "0.01"}


def default_learning_rate(task: str, optim: str, peft: bool = False) -> str:
    """The learning rate the trainer uses when none is given (AdamW's for every non-SGD optim)."""
    key = f"{task}+peft" if peft and task == "text" else task
    table = SGD_LEARNING_RATES if optim.startswith("sgd") else ADAMW_LEARNING_RATES
    return table.get(key, ADAMW_LEARNING_RATES["image"])


def with_defaults(argv: list[str], output_dir: str = "outputs/train") -> list[str]:
    """argv plus the defaults of the task and optimizer it names, for flags it does not set."""
    task = argv[argv.index("--task") + 1] if "--task" in argv else "image"
    optim = argv[argv.index("--optim") + 1] if "--optim" in argv else "adamw_torch"
    defaults = {
        "--output_dir": output_dir,
        **(IMAGE_DEFAULTS if task == "image" else TEXT_DEFAULTS),
    }
    defaults["--learning_rate"] = default_learning_rate(task, optim, "--use_peft" in argv)
    if not has_accelerator():
        # Without this flag a multi-process launch on a CPU-only machine does not set up gloo.
        defaults["--use_cpu"] = "true"
    return argv + [
        item for flag, value in defaults.items() if flag not in argv for item in (flag, value)
    ]


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, FOPTrainingArguments]:
    argv = with_defaults(list(sys.argv[1:] if argv is None else argv))
    parser = HfArgumentParser((ModelArguments, DataArguments, FOPTrainingArguments))
    return parser.parse_args_into_dataclasses(argv)


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: FOPTrainingArguments,
    callbacks: list[TrainerCallback] | None = None,
) -> RunResult:
    """Build data, model and FOPTrainer from the arguments, train, evaluate."""
    if model_args.task not in ("image", "text"):
        raise ValueError(f"--task must be 'image' or 'text', got {model_args.task!r}")
    if not has_accelerator():
        allow_fsdp_on_cpu()  # an FSDP config shards on CPU processes too (see cpu_fsdp.py)
    set_seed(training_args.seed)
    splits = load_splits(data_args, model_args.task, training_args.seed)
    columns = splits["train"].column_names
    label = find_column(columns, LABEL_COLUMNS, "label", data_args.label_column)
    if not hasattr(splits["train"].features[label], "names"):
        splits = splits.class_encode_column(label)
    names = splits["train"].features[label].names
    if data_args.long_tail_imbalance:
        splits["train"] = long_tailed(
            splits["train"], label, data_args.long_tail_imbalance, training_args.seed
        )
    counts = class_counts(splits["train"], label, len(names))

    if model_args.task == "image":
        image = find_column(columns, IMAGE_COLUMNS, "image", data_args.image_column)
        channels = 1 if np.asarray(splits["train"][0][image]).ndim == 2 else 3
        model = build_image_model(model_args, names, channels)
        size = model.config.image_size
        for split in splits.values():
            split.set_transform(image_transform(image, label, size, channels))
    else:
        text = find_column(columns, TEXT_COLUMNS, "text", data_args.text_column)
        model, tokenizer = build_text_model(model_args, names)

        def tokenize(batch: dict[str, list]) -> dict[str, Any]:
            encoded = tokenizer(
                batch[text],
                truncation=True,
                padding="max_length",
                max_length=data_args.max_seq_length,
            )
            encoded["labels"] = batch[label]
            return encoded

        splits = splits.map(tokenize, batched=True, remove_columns=columns)
    if model_args.use_peft:
        model = add_lora(model, model_args, model_args.task)

    accuracy = load_metric("accuracy")
    groups = load_metric("group_accuracy") if data_args.long_tail_imbalance else None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = (
            prediction.predictions[0]
            if isinstance(prediction.predictions, tuple)
            else prediction.predictions
        )
        predicted = np.argmax(logits, axis=-1)
        if groups is not None:
            result = groups.compute(
                predictions=predicted, references=prediction.label_ids, class_counts=counts
            )
            return {k: v for k, v in result.items() if v is not None}
        return accuracy.compute(predictions=predicted, references=prediction.label_ids)

    if model_args.task == "image":
        training_args.remove_unused_columns = False  # set_transform needs the raw columns
    trainer = FOPTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        data_collator=default_data_collator,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate())
    if trainer.is_fsdp_enabled:
        save_full_model(trainer)
    elif training_args.should_save:
        trainer.save_model()
    trainer.save_metrics("all", metrics)
    return RunResult(metrics=metrics, trainer=trainer)


def save_full_model(trainer: FOPTrainer) -> None:
    """The final model of a sharded run as one safetensors file (the Trainer saves it only as
    a sharded checkpoint). Gathering it is collective: every rank calls this, rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.model, options=options)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state = {name: tensor.clone() for name, tensor in state.items()}
        model.save_pretrained(trainer.args.output_dir, state_dict=state)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, training_args = parse_args(argv)
    result = run(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()})
    # Leave together and take the process group down before exiting: a rank that exits while
    # another still talks to it can abort inside gloo ("terminate called without an active
    # exception").
    accelerator = result.trainer.accelerator
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result.metrics


if __name__ == "__main__":
    main()
