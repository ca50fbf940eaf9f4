"""Train the classifier on scikit-learn's digits in its own process, as a preempted job or a torchrun worker would.

``python tests/support/train_digits.py CONFIG_JSON OUT.pt N_IMAGES [CHECKPOINT_DIR]`` trains
:func:`realfake.classify.train_classifier` on the first ``N_IMAGES`` digits at 16 px (RGB, so the timm
transforms run as they do on real data) and, on rank 0, saves the final state dict, train log and the epoch
it resumed from to ``OUT.pt``. Under ``torchrun`` every process runs it and joins the process group.
:func:`digits` builds the same images for the in-process reference runs of the tests.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from realfake.data.loaders import LabelledImages

# A tiny ResNet whose runs can be compared across batch splits: GroupNorm normalises each image on its own (batch
# norm would see half-batches) and a strided convolution replaces the stem's max-pool, whose exact ties on the
# digits' constant background would route whole gradients elsewhere on a 1e-7 difference.
GROUPNORM_RECIPE = dict(
    model="resnet18",
    model_kwargs={"channels": [8, 16, 32, 64], "norm_layer": "groupnorm1", "replace_stem_pool": True},
    image_size=16,
    batch_size=32,
    lr=0.05,
    sched="cosine",
    hflip=0.5,
    scale=(0.7, 1.0),
    color_jitter=0.3,
    input_norm="per_image",
    workers=0,
)


def digits(n: int) -> LabelledImages:
    """The first ``n`` digits as 16 px RGB images with their labels."""
    d = load_digits()
    images = (d.images[:n] * (255.0 / 16.0)).astype(np.uint8)
    return LabelledImages(
        [
            (Image.fromarray(x).resize((16, 16), Image.BILINEAR).convert("RGB"), int(y))
            for x, y in zip(images, d.target[:n], strict=True)
        ]
    )


def main(argv: list[str]) -> int:
    from realfake.classify import process_rank, train_classifier
    from realfake.config import ClassifierConfig

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")  # the batch arithmetic, epoch losses
    cfg = ClassifierConfig.model_validate_json(argv[0])
    model = train_classifier(digits(int(argv[2])), 10, cfg, checkpoint=argv[3] if len(argv) > 3 else None)
    if process_rank()[0] == 0:
        torch.save(
            {"state": model.state_dict(), "train_log": model.train_log, "resumed_from_epoch": model.resumed_from_epoch},
            argv[1],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
