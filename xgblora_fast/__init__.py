"""xgblora-fast: fused rank-1 adapters and in-place merges for XGBLoRA fine-tuning.

import xgblora_fast as xf
y = xf.rank1_linear(x, weight, bias, a, b, scale)        # fused, autograd-aware
layer = xf.FastRank1Linear.from_linear(linear, alpha=1.0)
xf.inject(model, target_modules=["q_proj", "v_proj"])    # swap in FastRank1Linear
layer.merge_()                                           # W += s b a^T, then re-init
xf.export_lora(booster, "adapter")                       # the fine-tune as a peft LoRA
xf.eject(model)                                          # plain nn.Linear again
"""

from xgblora_fast.boosting.booster import Booster
from xgblora_fast.boosting.checkpoint import load_checkpoint, save_checkpoint
from xgblora_fast.boosting.config import XGBLoRAConfig
from xgblora_fast.boosting.distributed import verify_replicas
from xgblora_fast.boosting.export import export_lora, unmerge_
from xgblora_fast.nn.layer import FastRank1Linear
from xgblora_fast.nn.patching import eject, inject
from xgblora_fast.ops.merge import merge_
from xgblora_fast.ops.rank1_linear import rank1_linear

__version__ = "0.1.0"

__all__ = [
    "Booster",
    "FastRank1Linear",
    "XGBLoRAConfig",
    "__version__",
    "eject",
    "export_lora",
    "inject",
    "load_checkpoint",
    "merge_",
    "rank1_linear",
    "save_checkpoint",
    "unmerge_",
    "verify_replicas",
]
