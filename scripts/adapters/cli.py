"""``python -m scripts.adapters <layout> ...``: one subcommand per layout, each a thin wrapper of its function."""

from __future__ import annotations

import argparse
from pathlib import Path

from .brats import MODALITIES, READERS, brats2021
from .common import write_datalist
from .folder import image_folder
from .isic import OFFICIAL, isic2018, official_paths
from .npz import medmnist


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.adapters", description="Turn a dataset download into the bundle's datalist JSON."
    )
    sub = parser.add_subparsers(dest="layout", required=True)

    folder = sub.add_parser("image-folder", help="ROOT/<split>/<class>/* images (OCT, Chest X-ray)")
    folder.add_argument("--root", required=True)
    folder.add_argument("--normal", nargs="+", required=True, help="normal class folder name(s)")
    folder.add_argument("--abnormal", nargs="*", help="abnormal class folder names (default: all others)")
    folder.add_argument(
        "--group-pattern",
        help="regex on file names whose first group (e.g. a patient id) keeps files together when validation is "
        r"carved from test, e.g. '^(person\d+|(?:NORMAL2-)?IM-\d+)[-_]' for Kermany Chest X-ray",
    )

    isic = sub.add_parser("isic2018", help="ISIC 2018 task 3 images + ground-truth CSVs")
    isic.add_argument("--root", help="unpacked official download (the four ISIC2018_Task3_* folders)")
    for key in ("train_images", "train_csv", "test_images", "test_csv"):
        isic.add_argument(f"--{key.replace('_', '-')}", dest=key, help=f"overrides the official {key} under --root")
    isic.add_argument("--normal", nargs="+", default=["NV"], help="normal class column(s) (default: NV)")

    brats = sub.add_parser("brats2021", help="BraTS 2021 case folders -> axial slice items")
    brats.add_argument("--root", required=True, help="folder of <case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz")
    brats.add_argument("--modality", choices=MODALITIES, default="flair")
    brats.add_argument("--reader", choices=READERS, default="nibabel")
    brats.add_argument("--central-fraction", type=float, default=0.5, help="central part of the axial slices kept")
    brats.add_argument("--slices", type=int, nargs=2, metavar=("FIRST", "LAST"), help="instead: slices FIRST..LAST")
    brats.add_argument("--min-brain-fraction", type=float, default=0.05, help="drop slices with less brain")
    brats.add_argument("--test-fraction", type=float, default=0.2, help="fraction of cases for test")
    brats.add_argument("--workers", type=int, default=1, help="processes reading cases")

    npz = sub.add_parser("medmnist", help="MedMNIST .npz -> PNG files")
    npz.add_argument("--npz", required=True)
    npz.add_argument("--normal", type=int, nargs="+", required=True, help="normal label(s), e.g. 0 for Pneumonia")
    npz.add_argument("--image-dir", help="where the PNG files go (default: next to --output)")

    for layout in sub.choices.values():
        default = 0.1 if layout is brats else 0.2
        layout.add_argument("--validation-fraction", type=float, default=default)
        layout.add_argument("--seed", type=int, default=0)
        layout.add_argument("--output", required=True, help="datalist JSON to write")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.layout == "image-folder":
        result = image_folder(
            args.root, args.normal, args.abnormal, args.validation_fraction, args.seed, group_pattern=args.group_pattern
        )
    elif args.layout == "isic2018":
        paths = official_paths(args.root) if args.root else {}
        paths.update({key: getattr(args, key) for key in OFFICIAL if getattr(args, key)})
        missing = [key for key in OFFICIAL if key not in paths]
        if missing:
            raise SystemExit(f"isic2018 needs --root or all of --{', --'.join(k.replace('_', '-') for k in missing)}.")
        result = isic2018(
            **paths, normal_classes=args.normal, validation_fraction=args.validation_fraction, seed=args.seed
        )
    elif args.layout == "brats2021":
        result = brats2021(
            args.root,
            args.modality,
            args.reader,
            args.central_fraction,
            tuple(args.slices) if args.slices else None,
            args.min_brain_fraction,
            args.validation_fraction,
            args.test_fraction,
            args.seed,
            args.workers,
        )
    else:
        image_dir = args.image_dir or str(Path(args.output).resolve().parent / "images")
        result = medmnist(args.npz, image_dir, args.normal, args.validation_fraction, args.seed)
    write_datalist(result, args.output)
