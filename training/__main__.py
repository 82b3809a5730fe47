"""`accelerate launch -m sparsemem.training RECIPE.yaml [--no-resume] [--eval]`"""

import sys

from sparsemem.cli import main

if __name__ == "__main__":
    sys.exit(main(["calibrate", *sys.argv[1:]]))
