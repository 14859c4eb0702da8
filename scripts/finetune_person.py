"""Stage 2 of DiffusionRig: fine-tune a stage-1 model on one person's album (personal prior).

    python scripts/finetune_person.py --data_dir personal_deca.lmdb \
        --model_path runs/stage1/model --output_dir runs/alice

--model_path takes a diffrig model directory or an official model*.pt (pass its architecture
flags if they differ from the official defaults). Settings come from configs/stage2_256.yaml
(the paper's: lr 1e-5, batch 4, 5k steps, global encoder frozen) unless --config names another.
"""

import sys
from pathlib import Path

from diffrig.training.cli import run

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "stage2_256.yaml")

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], stage=2, default_config=DEFAULT_CONFIG, description=__doc__.split("\n\n")[0],
                 aliases={"init_from": ["--model_path"]}))
