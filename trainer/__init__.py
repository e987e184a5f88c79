"""The hf-fop training application, installed as ``hf_fop_trainer``.

python -m hf_fop_trainer.train --optim fop ...            # one run
python -m hf_fop_trainer.compare                          # FOP vs AdamW side by side
accelerate launch --config_file trainer/accelerate/cpu_2proc.yaml -m hf_fop_trainer.train ...
"""
