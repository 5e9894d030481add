"""The ``xgblora-fast`` command line: ``finetune`` and its data loading."""
