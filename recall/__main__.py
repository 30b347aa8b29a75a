"""`python -m recall ...` and `torchrun --nproc_per_node N -m recall run ...` run the `recall` command."""

import sys

from recall.cli import main

sys.exit(main())
