"""`python -m bigtrain.cli COMMAND ...` (what a launcher runs: `torchrun --nproc_per_node 2 -m bigtrain.cli
generate RUN_DIR --prompt ...`)."""

import sys

from bigtrain.cli import main

sys.exit(main())
