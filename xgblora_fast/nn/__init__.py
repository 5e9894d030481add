"""Modules: ``FastRank1Linear`` (a drop-in ``nn.Linear`` with a rank-1 booster) and patching."""
