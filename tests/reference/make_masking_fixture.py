"""Write tests/fixtures/masking_reference.npz: iBOT masks drawn by the reference DINOv2 data code.

The official ``MaskingGenerator`` (dinov2/data/masking.py) and ``collate_data_and_cast``
(dinov2/data/collate.py) draw the masks of 100 batches of 32 images x 2 global crops at the
official settings (16 x 16 patch grid of a 224 px crop at patch 14, mask_probability 0.5,
mask ratios (0.1, 0.5), max_num_patches = half the grid). ``tests/data/test_masking.py``
compares the statistics of these masks with medjax's. Regenerate by hand, in an environment
separate from medjax's:

    pip install torch==2.13.0 && pip install --no-deps dinov2==0.0.1.dev2
    python tests/reference/make_masking_fixture.py

The two files are loaded from the installed package by path: importing ``dinov2.data`` pulls in
torchvision's datasets, which this environment does not need.
"""

import importlib.util
import pathlib
import random

import numpy as np
import torch

import dinov2

OUT = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "masking_reference.npz"
GRID = 16
IMAGES = 32  # images per batch; 2 global crops each -> 64 masks per batch
BATCHES = 100
MASK_PROBABILITY = 0.5
MASK_RATIOS = (0.1, 0.5)


def _load(name: str):
    path = pathlib.Path(dinov2.__file__).parent / "data" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"dinov2_data_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    masking, collate = _load("masking"), _load("collate")
    random.seed(0)  # the reference draws with Python's random module
    generator = masking.MaskingGenerator(input_size=(GRID, GRID), max_num_patches=0.5 * GRID * GRID)
    crop = torch.zeros(1, 1, 1)
    samples = [({"global_crops": [crop, crop], "local_crops": [crop]}, 0) for _ in range(IMAGES)]
    masks, bounds = [], []
    for _ in range(BATCHES):
        out = collate.collate_data_and_cast(samples, MASK_RATIOS, MASK_PROBABILITY, torch.float32,
                                            n_tokens=GRID * GRID, mask_generator=generator)
        masks.append(out["collated_masks"].numpy())
        bounds.append(out["upperbound"])
    masks = np.stack(masks)  # (BATCHES, 2 * IMAGES, GRID * GRID) bool
    np.savez_compressed(OUT, packed_masks=np.packbits(masks, axis=-1), grid=GRID, images=IMAGES,
                        upperbounds=np.asarray(bounds), dinov2_version=dinov2.__version__)
    print(f"wrote {OUT}: {masks.shape[0] * masks.shape[1]} masks, coverage of masked images "
          f"{masks.sum(-1)[masks.any(-1)].mean() / GRID ** 2:.4f}")


if __name__ == "__main__":
    main()
