"""Boosting: the config, the ``Booster`` that runs rounds, merge records, checkpoints."""
