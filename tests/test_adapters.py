"""Dataset adapters on tiny generated fixtures of each layout, and on the shared real-data samples when present.

Only the last BraTS test imports MONAI (to push a slice item through the bundle's own preprocessing).
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import zlib
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import BUNDLE_ROOT
from PIL import Image
from scripts.adapters import brats2021, image_folder, isic2018, main, medmnist, read_ras, stratified_holdout
from scripts.adapters.brats import MODALITIES

SHARED_DATA = BUNDLE_ROOT.parent / "shared" / "data"


def _png(path: Path, size=(16, 12), mode="L", value=100) -> Path:
    """A small image (format from the suffix) whose first row is noise seeded by its path: no two files are
    byte-identical unless a test copies one, since the adapters keep byte-identical files in one split."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new(mode, size, value if mode == "L" else (value,) * 3 if isinstance(value, int) else value)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    for x in range(size[0]):
        noise = int(rng.integers(0, 256))
        image.putpixel((x, 0), noise if mode == "L" else (noise,) * 3)
    image.save(path)
    return path


def _images(items):
    return {Path(item["image"]).name for item in items}


# --- image folder -------------------------------------------------------------------------------------------------


@pytest.fixture
def folder_root(tmp_path) -> Path:
    for i in range(4):
        _png(tmp_path / "train" / "NORMAL" / f"n{i}.png")
    _png(tmp_path / "train" / "SICK" / "s0.png")
    for i in range(5):
        _png(tmp_path / "test" / "NORMAL" / f"n{i}.png")
        _png(tmp_path / "test" / "SICK" / f"s{i}.png", size=(20, 12), mode="RGB")  # another size and colour mode
    (tmp_path / "test" / "SICK" / "notes.txt").write_text("not an image")
    (tmp_path / "test" / "SICK" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return tmp_path


def test_image_folder_splits_and_lists_what_it_leaves_out(folder_root):
    result = image_folder(str(folder_root), ["NORMAL"], validation_fraction=0.2, seed=1)
    assert _images(result.datalist["training"]) == {f"n{i}.png" for i in range(4)}
    validation, test = result.datalist["validation"], result.datalist["test"]
    assert result.counts()["validation"] == {"normal": 1, "abnormal": 1}  # stratified: 20 % of 5 + 5
    assert result.counts()["test"] == {"normal": 4, "abnormal": 4}
    assert not {i["image"] for i in validation} & {i["image"] for i in test}
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["SICK"] == "class 'SICK' not used in split 'training'"
    assert reasons["notes.txt"] == "not an image file"
    assert reasons["broken.png"].startswith("unreadable image")
    assert any("16x12: 9" in w and "20x12: 5" in w for w in result.warnings), result.warnings
    assert any("L (1 channel(s)): 9" in w and "RGB (3 channel(s)): 5" in w for w in result.warnings)
    summary = result.summary()
    assert "broken.png: unreadable image" in summary and "warning: images of 2 sizes" in summary
    assert "NORMAL 1, SICK 1" in summary  # per-class counts of the validation split


def test_image_folder_same_seed_same_split(folder_root):
    first, second = (image_folder(str(folder_root), ["NORMAL"], seed=3) for _ in range(2))
    assert first.datalist == second.datalist
    assert image_folder(str(folder_root), ["NORMAL"], check_headers=False).warnings == []


def test_image_folder_bad_class_names_are_named(folder_root):
    with pytest.raises(ValueError, match=r"Class folder\(s\) \['HEALTHY'\] not found in .*train; present"):
        image_folder(str(folder_root), ["HEALTHY"])
    (folder_root / "test" / "EMPTY").mkdir()
    with pytest.raises(ValueError, match=r"Class folder .*test/EMPTY holds no image"):
        image_folder(str(folder_root), ["NORMAL"])


def _pool(root: Path, n_normal: int, n_abnormal: int) -> Path:
    """``train/NORMAL`` (3 images) and a ``test`` split of distinct images to carve validation from."""
    for i in range(3):
        _png(root / "train" / "NORMAL" / f"t{i}.png")
    for i in range(n_normal):
        _png(root / "test" / "NORMAL" / f"n{i}.png")
    for i in range(n_abnormal):
        _png(root / "test" / "SICK" / f"s{i}.png")
    return root


def test_image_folder_ignores_hidden_folders(folder_root):
    plain = image_folder(str(folder_root), ["NORMAL"], seed=1)
    checkpoints = folder_root / "test" / ".ipynb_checkpoints"
    shutil.copyfile(folder_root / "test" / "NORMAL" / "n0.png", _png(checkpoints / "n0-checkpoint.png"))
    (folder_root / "test" / ".empty").mkdir()
    (folder_root / "train" / ".ipynb_checkpoints").mkdir()
    result = image_folder(str(folder_root), ["NORMAL"], seed=1)
    assert result.datalist == plain.datalist and result.skipped == plain.skipped


def test_image_folder_without_duplicates_keeps_todays_split(tmp_path):
    """The item-level carve of every earlier datalist: pinned, so that a data set without duplicates never moves."""
    result = image_folder(str(_pool(tmp_path, 10, 10)), ["NORMAL"], validation_fraction=0.3, seed=7)
    assert _images(result.datalist["validation"]) == {"n1.png", "n3.png", "n8.png", "s1.png", "s2.png", "s4.png"}
    pool = sorted(result.datalist["validation"] + result.datalist["test"], key=lambda item: item["image"])
    validation, test = stratified_holdout(pool, 0.3, 7)  # listed as the adapter lists them: by class folder and name
    assert (validation, test) == (result.datalist["validation"], result.datalist["test"])
    assert not any("duplicate" in line for line in result.notes + result.warnings)


def test_image_folder_keeps_byte_identical_files_in_one_split(tmp_path):
    """Each copy follows the split of the first-listed file of its group; every other item stays where it was."""
    root = _pool(tmp_path, 8, 8)
    originals = [f"n{i}.png" for i in range(4)] + [f"s{i}.png" for i in range(4)]
    for name in originals:
        folder = root / "test" / ("NORMAL" if name[0] == "n" else "SICK")
        shutil.copyfile(folder / name, folder / name.replace(".png", "_copy.png"))
    shutil.copyfile(root / "test" / "SICK" / "s0.png", root / "test" / "SICK" / "s0_second_copy.png")
    shutil.copyfile(root / "test" / "NORMAL" / "n7.png", root / "train" / "NORMAL" / "n7_in_training.png")
    pool = image_folder(str(root), ["NORMAL"], validation_fraction=0.5, seed=0)
    pool = pool.datalist["validation"] + pool.datalist["test"]
    item_level = _images(stratified_holdout(sorted(pool, key=lambda i: (i["class"], i["image"])), 0.5, 0)[0])
    copies = {name: original for original in originals for name in _images(pool) if name.startswith(original[:-4])}
    assert any((name in item_level) != (original in item_level) for name, original in copies.items())  # it split one

    result = image_folder(str(root), ["NORMAL"], validation_fraction=0.5, seed=0)
    validation = _images(result.datalist["validation"])
    assert validation == {name for name in _images(pool) if copies.get(name, name) in item_level}
    assert "n7.png" in _images(result.datalist["validation"] + result.datalist["test"])  # not moved out of test
    moved = sum(
        (name in item_level) != (original in item_level) for name, original in copies.items() if name != original
    )
    assert f"duplicates 17 byte-identical file(s) in 8 group(s) kept in one split ({moved} moved" in result.summary()
    assert "1 file(s) byte-identical to a file of an earlier split" in result.summary()
    assert "1 in test duplicate training" in result.summary()


def test_image_folder_group_pattern_carves_patients_together(tmp_path):
    for patient in range(6):
        for view in range(3):
            _png(tmp_path / "test" / "NORMAL" / f"p{patient}_{view}.png")
        for view in range(2):
            _png(tmp_path / "test" / "SICK" / f"q{patient}-{view}.png")
    _png(tmp_path / "train" / "NORMAL" / "t0.png")
    shutil.copyfile(tmp_path / "test" / "NORMAL" / "p0_0.png", tmp_path / "test" / "NORMAL" / "p1_9.png")
    output = tmp_path / "datalist.json"
    main(
        ["image-folder", "--root", str(tmp_path), "--normal", "NORMAL", "--output", str(output)]
        + ["--group-pattern", r"^([pq]\d+)[-_]", "--validation-fraction", "0.34"]
    )
    datalist = json.loads(output.read_text())
    patients = {
        split: {re.match(r"[pq]\d+", Path(i["image"]).name)[0] for i in datalist[split]}
        for split in ("validation", "test")
    }
    assert not patients["validation"] & patients["test"]
    assert len(patients["validation"] | patients["test"]) == 12
    assert ("p0" in patients["validation"]) == ("p1" in patients["validation"])  # joined by a byte-identical file
    assert sum(p.startswith("q") for p in patients["validation"]) == 2  # round(6 x 0.34) abnormal patients

    result = image_folder(str(tmp_path), ["NORMAL"], validation_fraction=0.34, group_pattern=r"^([pq]\d+)[-_]")
    assert "groups     validation 4  test 7  (by --group-pattern" in result.summary()  # p0 and p1: one unit
    _png(tmp_path / "test" / "SICK" / "p2_7.png")
    with pytest.raises(ValueError, match=r"--group-pattern .*: Group 'p2' holds normal and abnormal items: .*p2_7"):
        image_folder(str(tmp_path), ["NORMAL"], group_pattern=r"^([pq]\d+)[-_]")
    with pytest.raises(ValueError, match=r"--group-pattern '\^\(q\\\\d\+\)_' finds no group in 32 file name\(s\)"):
        image_folder(str(tmp_path), ["NORMAL"], group_pattern=r"^(q\d+)_")


def test_image_folder_refuses_a_test_split_of_one_class(folder_root):
    shutil.rmtree(folder_root / "test" / "SICK")
    with pytest.raises(
        ValueError, match=r"test split \(.*test\) needs normal and abnormal .* \['NORMAL'\] with normal"
    ):
        image_folder(str(folder_root), ["NORMAL"])


def test_image_folder_skips_truncated_images(folder_root):
    rng = np.random.default_rng(0)
    for name in ("cut.png", "cut.jpg"):
        path = folder_root / "test" / "NORMAL" / name
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # the header survives
    result = image_folder(str(folder_root), ["NORMAL"])
    assert not {"cut.png", "cut.jpg"} & _images(result.datalist["validation"] + result.datalist["test"])
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["cut.png"].startswith("unreadable image") and reasons["cut.jpg"].startswith("unreadable image")


def test_image_folder_validation_of_one_class_falls_back_with_named_abnormal(folder_root):
    _png(folder_root / "val" / "NORMAL" / "v0.png")
    result = image_folder(str(folder_root), ["NORMAL"], ["SICK"], validation_fraction=0.2, seed=1)
    assert result.counts()["validation"] == {"normal": 1, "abnormal": 1}  # carved from test
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["v0.png"] == "validation split lacks a class; not used"
    assert any(re.search(r"validation folder .*val lacks class folder\(s\) \['SICK'\]", w) for w in result.warnings)


@pytest.mark.skipif(not (SHARED_DATA / "oct_kermany_tiny").is_dir(), reason="shared OCT sample absent")
def test_oct_kermany_tiny_reports_its_two_image_sizes(tmp_path):
    """The sample holds only ``val/``: train on its NORMAL folder and test on all of it (a smoke test of real files)."""
    source = SHARED_DATA / "oct_kermany_tiny"
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "NORMAL").symlink_to(source / "val" / "NORMAL")
    (tmp_path / "test").symlink_to(source / "val")
    result = image_folder(str(tmp_path), ["NORMAL"], seed=0)
    with open(source / "manifest.csv") as f:
        manifest = list(csv.DictReader(f))
    per_class = Counter(row["label"] for row in manifest)
    assert len(result.datalist["training"]) == per_class["NORMAL"]
    assert result.counts()["validation"]["normal"] + result.counts()["test"]["normal"] == per_class["NORMAL"]
    assert result.counts()["validation"]["abnormal"] + result.counts()["test"]["abnormal"] == len(manifest) - 8
    sizes = Counter(
        f"{row['width']}x{row['height']}" for row in manifest + [r for r in manifest if r["label"] == "NORMAL"]
    )
    assert [w for w in result.warnings if "sizes" in w] == [
        f"images of 2 sizes (width x height: count) {', '.join(f'{s}: {n}' for s, n in sizes.most_common())}; "
        "all are resized to image_size"
    ]
    assert result.skipped == []


# --- ISIC 2018 ----------------------------------------------------------------------------------------------------

ISIC_HEADER = ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def _isic_split(folder: Path, csv_file: Path, classes: dict[str, str], extra_rows=()):
    rows = []
    for image_id, name in classes.items():
        rows.append([image_id] + [f"{float(c == name):.1f}" for c in ISIC_HEADER[1:]])
        _png(folder / f"{image_id}.jpg", size=(12, 9), mode="RGB", value=(200, 120, 90))
    csv_file.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_file, "w", newline="") as f:
        csv.writer(f).writerows([ISIC_HEADER, *rows, *extra_rows])


@pytest.fixture
def isic_root(tmp_path) -> Path:
    train = {f"ISIC_{i:07d}": name for i, name in enumerate(["NV"] * 5 + ["MEL", "BCC", "BKL"])}
    test = {f"ISIC_{100 + i:07d}": name for i, name in enumerate(["NV"] * 5 + ["MEL", "DF", "VASC", "AKIEC", "MEL"])}
    paths = {
        "train_images": tmp_path / "ISIC2018_Task3_Training_Input",
        "train_csv": tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
        "test_images": tmp_path / "ISIC2018_Task3_Validation_Input",
        "test_csv": tmp_path / "ISIC2018_Task3_Validation_GroundTruth" / "ISIC2018_Task3_Validation_GroundTruth.csv",
    }
    missing_image = ["ISIC_0000099", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"]
    two_hot = ["ISIC_0000098", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"]
    _isic_split(paths["train_images"], paths["train_csv"], train, [missing_image, two_hot])
    _isic_split(paths["test_images"], paths["test_csv"], test)
    (paths["train_images"] / "LICENSE.txt").write_text("CC-BY-NC")
    _png(paths["test_images"] / "ISIC_0000500.png")  # an image without a CSV row
    return tmp_path


def test_isic2018_nv_normal_validation_from_official_validation(isic_root):
    from scripts.adapters.isic import official_paths

    result = isic2018(**official_paths(str(isic_root)), validation_fraction=0.4, seed=0)
    training = result.datalist["training"]
    assert len(training) == 5 and {i["class"] for i in training} == {"NV"} and {i["label"] for i in training} == {0}
    assert result.counts()["validation"] == {"normal": 2, "abnormal": 2}
    assert result.counts()["test"] == {"normal": 3, "abnormal": 3}
    assert all(
        i["label"] == int(i["class"] != "NV") for split in ("validation", "test") for i in result.datalist[split]
    )
    reasons = [s["reason"] for s in result.skipped]
    assert any(s["path"].endswith("csv:ISIC_0000099") and "missing from" in s["reason"] for s in result.skipped)
    assert any(s["path"].endswith("csv:ISIC_0000098") and "not one-hot" in s["reason"] for s in result.skipped)
    assert "3 abnormal training image(s) not used (training is normal only): BCC 1, BKL 1, MEL 1" in reasons
    assert any(s["path"].endswith("ISIC_0000500.png") and "has no row" in s["reason"] for s in result.skipped)
    assert any(s["path"].endswith("LICENSE.txt") for s in result.skipped)
    assert result.warnings == []  # one size, one mode


def test_isic2018_second_file_of_an_image_id_is_listed(isic_root):
    from scripts.adapters.isic import official_paths

    _png(isic_root / "ISIC2018_Task3_Validation_Input" / "ISIC_0000100.png")
    result = isic2018(**official_paths(str(isic_root)))
    used = [
        i["image"] for split in ("validation", "test") for i in result.datalist[split] if "ISIC_0000100" in i["image"]
    ]
    assert [Path(image).name for image in used] == ["ISIC_0000100.jpg"]
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert re.fullmatch(r"repeats image id ISIC_0000100; .*ISIC_0000100.jpg is used", reasons["ISIC_0000100.png"])


def test_isic2018_csv_without_class_columns_is_named(isic_root, tmp_path):
    from scripts.adapters.isic import official_paths

    paths = official_paths(str(isic_root))
    bad = tmp_path / "bad.csv"
    bad.write_text("image,MEL,NV\nISIC_0000000,0.0,1.0\n")
    with pytest.raises(ValueError, match=r"bad.csv lacks column\(s\) \['BCC', 'AKIEC', 'BKL', 'DF', 'VASC'\]"):
        isic2018(**{**paths, "train_csv": str(bad)})
    with pytest.raises(ValueError, match="Unknown ISIC class"):
        isic2018(**paths, normal_classes=("NEVUS",))


def test_cli_writes_relative_datalist_and_skipped_csv(isic_root, tmp_path, capsys):
    output = tmp_path / "lists" / "isic.json"
    main(["isic2018", "--root", str(isic_root), "--output", str(output)])
    datalist = json.loads(output.read_text())
    assert sorted(datalist) == ["test", "training", "validation"]
    first = datalist["training"][0]["image"]
    assert not Path(first).is_absolute() and (output.parent / first).is_file()
    with open(tmp_path / "lists" / "isic_skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    assert len(skipped) == 5 and set(skipped[0]) == {"path", "reason"}
    printed = capsys.readouterr().out
    assert "training        5 normal      0 abnormal" in printed and "missing from" in printed


# --- BraTS 2021 ---------------------------------------------------------------------------------------------------

SHAPE = (24, 20, 16)
AFFINE = np.diag([-2.0, 2.0, -3.0, 1.0])  # x and z stored flipped: RAS slice k is stored slice 15 - k
TUMOUR_RAS_SLICES = {9, 10}  # stored slices 5 and 6
EMPTY_RAS_SLICE = 4  # stored slice 11, all zero: background
KEPT_RAS_SLICES = set(range(4, 12))  # the central half of 16 slices


def _write_case(root: Path, name: str, tumour: bool, seed: int, skip=(), seg_shape=SHAPE):
    rng = np.random.default_rng(seed)
    volume = np.zeros(SHAPE, np.float32)
    volume[4:20, 3:17, :] = 100 + rng.normal(0, 5, (16, 14, SHAPE[2]))
    volume[:, :, 11] = 0
    seg = np.zeros(seg_shape, np.uint8)
    if tumour:
        seg[8:14, 6:12, 5:7] = 2
        volume[8:14, 6:12, 5:7] = 200.0
    case = root / name
    case.mkdir(parents=True)
    for kind in MODALITIES:
        if kind not in skip:
            nib.save(nib.Nifti1Image(volume, AFFINE), case / f"{name}_{kind}.nii.gz")
    nib.save(nib.Nifti1Image(seg, AFFINE), case / f"{name}_seg.nii.gz")


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    for index, tumour in enumerate([True, True, False, False, True, False]):
        _write_case(root, f"BraTS2021_{index:05d}", tumour, seed=index)
    _write_case(root, "BraTS2021_00090", True, seed=90, skip=("t2",))
    _write_case(root, "BraTS2021_00091", True, seed=91, seg_shape=(24, 20, 15))
    (root / "README.txt").write_text("not a case")
    return root


@pytest.mark.parametrize("reader", ["nibabel", "itk"])
def test_brats2021_slices_split_by_case(brats_root, reader):
    result = brats2021(str(brats_root), "t1ce", reader, validation_fraction=0.2, test_fraction=0.35, seed=0)
    cases = {split: {Path(i["image"]).parent.name for i in items} for split, items in result.datalist.items()}
    assert [len(cases[s]) for s in ("training", "validation", "test")] == [3, 1, 2]
    assert not (cases["training"] & cases["validation"] or cases["training"] & cases["test"])
    assert not cases["validation"] & cases["test"]
    tumour_cases = {f"BraTS2021_{i:05d}" for i in (0, 1, 4)}
    for split, items in result.datalist.items():
        for item in items:
            case = Path(item["image"]).parent.name
            assert item["image"].endswith(f"{case}_t1ce.nii.gz")
            assert item["label"] == int(case in tumour_cases and item["slice"] in TUMOUR_RAS_SLICES), item
        for case in cases[split]:
            kept = {i["slice"] for i in items if Path(i["image"]).parent.name == case}
            expected = KEPT_RAS_SLICES - {EMPTY_RAS_SLICE}
            assert kept == (expected - TUMOUR_RAS_SLICES if split == "training" and case in tumour_cases else expected)
    reasons = {Path(s["path"]).name: s["reason"] for s in result.skipped}
    assert reasons["BraTS2021_00090"].startswith("case BraTS2021_00090 lacks t2 (expected BraTS2021_00090_t2.nii.gz)")
    assert reasons["BraTS2021_00091"] == (
        "case BraTS2021_00091: segmentation shape (24, 20, 15) differs from the t1ce shape (24, 20, 16)"
    )
    assert reasons["README.txt"] == "not a case folder"
    background = [r for name, r in reasons.items() if name.endswith("_t1ce.nii.gz")]
    assert len(background) == 6 and all(
        f"1 slice(s) with brain fraction < 0.05: [{EMPTY_RAS_SLICE}]" in r for r in background
    )
    n_training_tumour = 2 * len(cases["training"] & tumour_cases)
    assert any(f"{n_training_tumour} tumour slice(s) of 3 training case(s)" in r for r in reasons.values()) == bool(
        n_training_tumour
    )
    assert "cases      training 3  validation 1  test 2" in result.summary()


def test_brats2021_readers_agree(brats_root):
    path = brats_root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    by_nibabel, by_itk = read_ras(path, "nibabel"), read_ras(path, "itk")
    assert by_nibabel.shape == SHAPE and np.array_equal(by_nibabel, by_itk)
    assert set(np.nonzero(by_nibabel.any(axis=(0, 1)))[0]) == TUMOUR_RAS_SLICES
    with pytest.raises(ValueError, match="Unknown reader 'simpleitk'; allowed: nibabel, itk"):
        brats2021(str(brats_root), reader="simpleitk")
    with pytest.raises(ValueError, match="Unknown modality 'dwi'; allowed: flair, t1, t1ce, t2"):
        brats2021(str(brats_root), modality="dwi")


@pytest.mark.parametrize("image_reader", ["NibabelReader", "ITKReader"])
def test_brats_item_through_bundle_preprocessing(brats_root, image_reader):
    """A slice item of the adapter becomes, through configs/train.json's own transforms, the 2D slice it names."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"image_reader": image_reader, "image_size": 32})
    preprocessing = Compose(parser.get_parsed_content("preprocessing_transforms"))
    result = brats2021(str(brats_root), "flair", validation_fraction=0.2, test_fraction=0.5, seed=0)
    items = result.datalist["test"] + result.datalist["validation"]  # 4 of 6 cases: at least one with tumour
    for label in (0, 1):
        item = next(i for i in items if i["label"] == label and i["slice"] in TUMOUR_RAS_SLICES | {5})
        image = preprocessing(dict(item))["image"]
        assert tuple(image.shape) == (1, 32, 32)
        assert (float(image.max()) > 0.8) == bool(label), (item, float(image.max()))  # tumour voxels are brightest


# --- MedMNIST -----------------------------------------------------------------------------------------------------


def _npz(path: Path, drop=()) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 4), ("test", 6)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1)
    np.savez(path, **{k: v for k, v in arrays.items() if k not in drop})
    return path


def test_medmnist_writes_pngs_and_keeps_normal_training(tmp_path):
    npz = _npz(tmp_path / "toy.npz")
    result = medmnist(str(npz), str(tmp_path / "images"), normal_labels=[0, 2])
    assert result.counts() == {
        "training": {"normal": 4, "abnormal": 0},
        "validation": {"normal": 3, "abnormal": 1},
        "test": {"normal": 4, "abnormal": 2},
    }
    with np.load(npz) as data:
        for item in result.datalist["test"]:
            index = int(Path(item["image"]).name.split("_")[1])
            assert np.array_equal(np.asarray(Image.open(item["image"])), data["test_images"][index])
            assert item["class"] == int(data["test_labels"][index, 0])
    assert (
        result.skipped[0]["reason"] == "2 abnormal training image(s) not written (training is normal only): label 1 2"
    )
    assert not list((tmp_path / "images" / "train").glob("*label1.png"))


def test_medmnist_bad_npz_is_named(tmp_path):
    npz = _npz(tmp_path / "partial.npz", drop=("val_labels", "test_images"))
    with pytest.raises(KeyError, match=r"partial.npz lacks array\(s\) \['val_labels', 'test_images'\]"):
        medmnist(str(npz), str(tmp_path / "out"), [0])
    with pytest.raises(ValueError, match=r"Normal label\(s\) \[7\] do not occur .* labels present: \[0, 1, 2\]"):
        medmnist(str(_npz(tmp_path / "toy.npz")), str(tmp_path / "out"), [7])


@pytest.mark.skipif(not (SHARED_DATA / "pneumoniamnist_tiny").is_dir(), reason="shared PneumoniaMNIST sample absent")
def test_pneumoniamnist_tiny(tmp_path):
    npz = SHARED_DATA / "pneumoniamnist_tiny" / "pneumoniamnist_balanced_subset.npz"
    result = medmnist(str(npz), str(tmp_path / "images"), normal_labels=[0])
    with np.load(npz) as data:
        expected = {
            split: np.bincount(data[f"{name}_labels"].ravel(), minlength=2)
            for split, name in (("training", "train"), ("validation", "val"), ("test", "test"))
        }
        first = result.datalist["validation"][0]
        assert np.array_equal(np.asarray(Image.open(first["image"])), data["val_images"][0])
    assert result.counts()["training"] == {"normal": int(expected["training"][0]), "abnormal": 0}
    for split in ("validation", "test"):
        assert result.counts()[split] == {"normal": int(expected[split][0]), "abnormal": int(expected[split][1])}
    assert len(list((tmp_path / "images").rglob("*.png"))) == sum(len(v) for v in result.datalist.values())
