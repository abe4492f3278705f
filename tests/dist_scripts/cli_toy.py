"""``moetrain`` command line with the toy task standing in for translation (launcher tests).

    torchrun --nproc_per_node 2 tests/dist_scripts/cli_toy.py train CONFIG --output-dir DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moetrain import tasks  # noqa: E402
from moetrain.cli import main  # noqa: E402

tasks.TASKS["translation"] = "toy_task:ToyTask"

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
