"""One rank of `bigtrain convert` under torchrun (`bigtrain.cli.tools.convert` starts them)."""

import os
import sys
from pathlib import Path

from bigtrain.cli.lifetime import die_with_launcher
from bigtrain.cli.report import fail

if __name__ == "__main__":
    die_with_launcher()  # before torch: this rank dies with its torchrun (cli/lifetime.py)
    try:
        from bigtrain.checkpoint.convert import convert_here

        convert_here(Path(sys.argv[1]))
    except Exception as err:  # one paragraph, like every command
        sys.exit(fail(err, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))))
