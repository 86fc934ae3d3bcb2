"""``python -m aiserver`` is the ``aiserver`` console script."""

import sys

from aiserver.cli import main

sys.exit(main())
