"""``python -m msa.bench``: see ``msa.bench`` for the sections and ``--help`` for every option."""

import sys

from msa.bench.cli import main

sys.exit(main())
