"""Stage 1 of DiffusionRig: learn the generic face prior on a large LMDB dataset (FFHQ).

    accelerate launch --config_file accelerate_config.yaml scripts/train_stage1.py \
        --data_dir ffhq256_deca.lmdb --output_dir runs/stage1 --resume latest

Settings come from configs/stage1_256.yaml (the paper's: lr 1e-4, batch 32 per GPU, 50k steps)
unless --config names another file; any setting can be overridden by its flag (--help lists them).
SIGTERM/Ctrl-C save a checkpoint and exit 0; --resume latest continues from it.
"""

import sys
from pathlib import Path

from diffrig.training.cli import run

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "stage1_256.yaml")

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], stage=1, default_config=DEFAULT_CONFIG, description=__doc__.split("\n\n")[0]))
