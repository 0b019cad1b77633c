"""``python -m autoq``: the command line; also what torchrun runs (``torchrun --nproc-per-node N -m autoq search ...``)."""

import sys

from autoq.cli import main

sys.exit(main())
