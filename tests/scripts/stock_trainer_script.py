"""A stock Hugging Face training script: HfArgumentParser(TrainingArguments) and Trainer, no FOP
import. The test runs it through ``python -m hf_fop.run`` with ``--optim fop``."""

import json
import sys
from pathlib import Path

from transformers import HfArgumentParser, Trainer, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.helpers import image_dataset, tiny_vit

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
trainer = Trainer(model=tiny_vit(), args=args, train_dataset=image_dataset())
trainer.train()
optimizer = trainer.optimizer.optimizer
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
summary = {
    "optimizer": type(optimizer).__name__,
    "damping": optimizer.param_groups[0].get("damping"),
    "first_loss": sum(losses[:3]) / 3,
    "last_loss": sum(losses[-3:]) / 3,
    "logged_fop_statistics": all(
        "fop/eta_mean" in e for e in trainer.state.log_history if "loss" in e
    ),
}
Path(args.output_dir, "summary.json").write_text(json.dumps(summary))
