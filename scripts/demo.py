"""Run the whole DiffusionRig pipeline on the synthetic world and score the edits.

    python scripts/demo.py                      # about 8 minutes on a 2-core CPU
    python scripts/demo.py --device cuda        # a larger world, image size and model on one GPU
    python scripts/demo.py --quick              # every step, minimal sizes (a minute or two)

Makes data, trains stage 1 and stage 2 (one person), edits pose, light and expression with and
without DDIM inversion, and writes OUT/grids/*.png and OUT/metrics.json (PSNR and SSIM against
the world's ground truth, on the face and on the rest). Re-running reuses finished steps.
"""

import sys

from diffrig.demo import main

if __name__ == "__main__":
    sys.exit(main())
