"""``python -m xgblora_fast.cli``: the same as the ``xgblora-fast`` command."""

import sys

from xgblora_fast.cli.main import main

sys.exit(main())
