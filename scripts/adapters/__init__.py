"""Dataset adapters: raw downloads -> the bundle's datalist (``{"training": [...], "validation": [...],
"test": [...]}``, items ``{"image": path, "label": 0 | 1}``, normal = 0, paths relative to the datalist).

One module per layout: ``folder`` (``ROOT/<split>/<class>/*``: OCT, Chest X-ray), ``isic`` (ISIC 2018 task 3),
``brats`` (BraTS 2021 volumes -> slice items for ``SelectSliced``) and ``npz`` (MedMNIST). Each returns an
``AdapterResult`` holding the datalist and every item it left out with the reason, so that nothing is dropped
silently; ``write_datalist`` writes it and prints counts per split and class. ``python -m scripts.adapters
--help`` is the command-line entry point (``cli``).
"""

from .brats import brats2021, read_ras
from .cli import main
from .common import AdapterResult, stratified_holdout, write_datalist
from .folder import image_folder
from .isic import isic2018
from .npz import medmnist

__all__ = [
    "AdapterResult",
    "brats2021",
    "image_folder",
    "isic2018",
    "main",
    "medmnist",
    "read_ras",
    "stratified_holdout",
    "write_datalist",
]
