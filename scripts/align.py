"""FFHQ-align the faces of a folder of photos: ``python scripts/align.py -i IN -o OUT -s 256``."""

import sys

from diffrig.data.align import main

if __name__ == "__main__":
    sys.exit(main())
