"""The command-line trainer with every gradient FOP steps on one ulp larger, (1 + 2^-23).

Another parallel layout (FSDP2 against DDP) changes the same thing: the order in which each
gradient is summed across ranks, and so its last bits. The distance between this run and the
plain one is therefore the noise floor that layout is held to: the defaults amplify round-off
over the steps, as every eigenbasis-Adam method does (benchmarks/roundoff.py), so the last bit
alone cannot be the yardstick.
"""

import runpy

import torch

from hf_fop import FOP

ULP = 2.0**-23
_step = FOP.step


def step(self: FOP, closure=None):
    with torch.no_grad():
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.mul_(1 + ULP)
    return _step(self, closure)


FOP.step = step
runpy.run_module("hf_fop_trainer.train", run_name="__main__", alter_sys=True)
