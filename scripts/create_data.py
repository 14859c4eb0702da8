"""Build a DiffusionRig LMDB dataset from aligned faces:
``python scripts/create_data.py --data_dir aligned/ --output_dir album.lmdb --use_meanshape True --deca_dir data``."""

import sys

from diffrig.data.create import main

if __name__ == "__main__":
    sys.exit(main())
