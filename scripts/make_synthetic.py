"""Write synthetic portraits with ground-truth codes:
``python scripts/make_synthetic.py --identities N --per_identity K --size S --output_dir DIR --seed 0``."""

import sys

from diffrig.data.synthetic.cli import main

if __name__ == "__main__":
    sys.exit(main())
