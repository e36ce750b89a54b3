"""Input preprocessing that a model file describes: how PIL images of every pixel format are read, and the global and
the local (CLAHE) histogram equalisation modes."""

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose
from PIL import Image as PILImage
from scipy.ndimage import uniform_filter
from scripts.datalists import list_inputs, with_grid_phases
from scripts.encoders import STRIDE
from scripts.inputs import BadInputError
from scripts.preprocessing import input_transforms, item_transforms, resolve_spec
from scripts.transforms import GridShiftd, LocalHistogramEqualised

HISTOGRAM_SPEC = {"kind": "image", "reader": "PILReader", "intensity": {"mode": "histogram"}}
CLAHE_SPEC = {"kind": "image", "intensity": {"mode": "clahe"}}
RANGE_SPEC = {"kind": "image"}  # the 2D default: the fixed 0-255 range


def _film(path, exposure_gamma: float):
    """An 8-bit 'film' with smooth anatomy-like structure, under- or over-exposed by a gamma curve."""
    y, x = np.mgrid[0:128, 0:128] / 127.0
    structure = 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) + 0.2 * np.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) / 0.02)
    structure = (structure - structure.min()) / (structure.max() - structure.min())
    PILImage.fromarray(np.round(255 * structure**exposure_gamma).astype(np.uint8)).save(path)
    return str(path)


def _prepared(spec, path):
    return Compose(item_transforms(spec, 64, 1))({"image": path})["image"]


def _pixel_formats(folder):
    """One grey ramp saved in the PNG and JPEG pixel formats PILReader would otherwise hand over raw."""
    ramp = np.tile(np.arange(0, 253, 4, dtype=np.uint8), (64, 1))
    opaque = np.full_like(ramp, 255)
    images = {
        "grey.png": PILImage.fromarray(ramp),
        "palette.png": PILImage.fromarray(ramp).convert("P"),
        "grey_alpha.png": PILImage.fromarray(np.dstack([ramp, opaque]), "LA"),
        "rgba.png": PILImage.fromarray(np.dstack([ramp, ramp, ramp, opaque // 2]), "RGBA"),
        "cmyk.jpg": PILImage.fromarray(np.dstack([ramp] * 3)).convert("CMYK"),
    }
    for name, image in images.items():
        image.save(folder / name, quality=100)
    return {name: str(folder / name) for name in images}


@pytest.mark.parametrize("channels", [1, 3])
def test_every_pil_pixel_format_reads_as_the_grey_levels_it_shows(tmp_path, channels):
    prepare = Compose(item_transforms(RANGE_SPEC, 64, channels))
    prepared = {name: prepare({"image": path})["image"] for name, path in _pixel_formats(tmp_path).items()}
    reference = prepared.pop("grey.png")
    assert reference.shape == (channels, 64, 64)
    for name, image in prepared.items():  # palette indices, alpha and CMYK ink would each read as other values
        assert image.shape == reference.shape, name
        assert torch.allclose(image, reference, atol=2 / 255), (name, float((image - reference).abs().max()))


def test_inference_takes_images_with_an_alpha_channel_as_evaluation_does(tmp_path):
    paths = _pixel_formats(tmp_path)
    for name in ("grey_alpha.png", "rgba.png", "palette.png"):
        evaluated = Compose(item_transforms(RANGE_SPEC, 64, 1))({"image": paths[name]})["image"]
        inferred = input_transforms(RANGE_SPEC, 64, 1)({"image": paths[name]})["image"]
        assert torch.equal(torch.as_tensor(inferred), torch.as_tensor(evaluated)), name


def test_a_16_bit_image_is_refused_by_an_8_bit_fixed_range_and_read_by_percentiles(tmp_path):
    ramp = np.tile(np.arange(0, 64 * 1000, 1000, dtype=np.uint16), (64, 1))
    PILImage.fromarray(ramp).save(tmp_path / "deep.png")
    with pytest.raises(Exception) as refused:
        _prepared(RANGE_SPEC, str(tmp_path / "deep.png"))
    error = refused.value if isinstance(refused.value, BadInputError) else refused.value.__cause__
    assert isinstance(error, BadInputError) and "clip it to white" in str(error) and "percentiles" in str(error)
    spec = {"kind": "image", "intensity": {"mode": "percentiles", "lower": 0.5, "upper": 99.5}}
    image = _prepared(spec, str(tmp_path / "deep.png"))
    assert 0.45 < float(image.mean()) < 0.55  # the ramp, spread over [0, 1], not clipped


def test_inference_lists_image_files_in_either_letter_case_and_names_the_files_it_leaves_out(tmp_path, caplog):
    for name in ("a.png", "B.PNG", "c.JPG", "d.Jpeg", "e.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    patterns = ["*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff"]  # inference.json's 2D default
    with caplog.at_level("WARNING"):
        listed = [Path(item["image"]).name for item in list_inputs(str(tmp_path), patterns)]
    assert listed == ["B.PNG", "a.png", "c.JPG", "d.Jpeg", "e.tif"]
    assert "1 file(s)" in caplog.text and "notes.txt" in caplog.text
    assert [Path(i["image"]).name for i in list_inputs(str(tmp_path), "[ab].*")] == ["a.png"]  # a class stays as typed


def test_histogram_mode_is_stored_with_its_bin_count():
    assert resolve_spec(HISTOGRAM_SPEC)["intensity"] == {"mode": "histogram", "num_bins": 256}
    with pytest.raises(ValueError, match="histogram"):  # the error lists the modes there are
        resolve_spec({**HISTOGRAM_SPEC, "intensity": {"mode": "equalise"}})


def test_histogram_mode_maps_other_exposures_of_one_film_onto_one_another(tmp_path):
    films = [_film(tmp_path / f"film_{gamma}.png", gamma) for gamma in (0.6, 1.0, 1.6)]
    fixed = [_prepared(RANGE_SPEC, film) for film in films]
    equalised = [_prepared(HISTOGRAM_SPEC, film) for film in films]
    assert min(float((image - fixed[1]).abs().mean()) for image in (fixed[0], fixed[2])) > 0.05
    assert max(float((image - equalised[1]).abs().mean()) for image in (equalised[0], equalised[2])) < 0.01
    for image in equalised:  # equalised: spread over [0, 1], about uniformly
        assert float(image.min()) == pytest.approx(0.0, abs=0.02) and float(image.max()) == pytest.approx(1.0, abs=0.02)
        assert float(image.mean()) == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("spec", [HISTOGRAM_SPEC, CLAHE_SPEC], ids=["histogram", "clahe"])
def test_equalising_modes_prepare_inference_input_as_evaluation_does(tmp_path, spec):
    film = _film(tmp_path / "film.png", 1.3)
    whole = input_transforms(spec, 64, 1)({"image": film})["image"]
    assert torch.equal(torch.as_tensor(whole), torch.as_tensor(_prepared(spec, film)))


def test_clahe_mode_is_stored_with_its_settings_and_refuses_what_it_cannot_equalise():
    assert resolve_spec(CLAHE_SPEC)["intensity"] == {
        "mode": "clahe",
        "clip_limit": 0.01,
        "kernel_fraction": 0.125,
        "num_bins": 256,
    }
    with pytest.raises(ValueError, match="for 2D images"):
        resolve_spec({"kind": "volume", "intensity": {"mode": "clahe"}})
    with pytest.raises(ValueError, match="clip_limit"):
        item_transforms({"kind": "image", "intensity": {"mode": "clahe", "clip_limit": 0}}, 64, 1)
    with pytest.raises(ValueError, match="needs a_min and a_max"):
        resolve_spec({"kind": "image", "intensity": {"mode": "range"}})
    equalise = LocalHistogramEqualised("image")
    with pytest.raises(ValueError, match="grey or RGB"):
        equalise({"image": torch.rand(2, 32, 32)})


def test_clahe_mode_raises_faint_local_detail_evenly_across_an_exposure_gradient(tmp_path):
    """Faint texture over a strong left-to-right exposure gradient: global equalisation leaves the texture about
    as faint as it was (a ramp is already uniform), CLAHE raises it, on the dark and the bright side alike."""
    y, x = np.mgrid[0:128, 0:128] / 127.0
    path = tmp_path / "gradient.png"
    PILImage.fromarray(np.round(255 * (0.1 + 0.8 * x + 0.03 * np.sin(40 * y))).astype(np.uint8)).save(path)

    def detail(spec):  # the texture's strength on the dark and on the bright side
        image = Compose(item_transforms(spec, 128, 1))({"image": str(path)})["image"][0].numpy()
        high_passed = image - uniform_filter(image, 16)
        return high_passed[:, 8:40].std(), high_passed[:, 88:120].std()

    histogram, clahe = detail(HISTOGRAM_SPEC), detail(CLAHE_SPEC)
    assert min(clahe) > 1.4 * max(histogram)
    assert clahe[0] == pytest.approx(clahe[1], rel=0.1)


def test_clahe_mode_equalises_colour_images_and_keeps_them_in_the_unit_range():
    rgb = torch.stack([torch.linspace(0, 200, 64).repeat(64, 1) + 10 * c for c in range(3)])
    out = LocalHistogramEqualised("image")({"image": rgb})["image"]
    assert out.shape == rgb.shape and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(out, (rgb - rgb.min()) / (rgb.max() - rgb.min()), atol=0.02)


def test_png_slice_phantoms_label_each_slice_by_its_lesion_and_read_as_2d_images(tmp_path):
    """The brain-like 2D check set: 8-bit PNG slices, abnormal exactly where a lesion is, read by the 2D default."""
    from scripts.datalists import load_split
    from scripts.synthetic import prepare_png_slices

    datalist = prepare_png_slices(tmp_path, splits={"training": (1, 0), "test": (1, 1)}, shape=(48, 48, 24))
    assert {item["label"] for item in datalist["training"]} == {0}
    assert {item["label"] for item in datalist["test"]} == {0, 1}
    first = PILImage.open(tmp_path / datalist["test"][0]["image"])
    assert first.mode == "L" and first.size == (48, 48)
    items = load_split(str(tmp_path / "datalist.json"), "test", base_dir=str(tmp_path))
    image = Compose(item_transforms(RANGE_SPEC, image_size=32, channels=1))(items[-1])["image"]
    assert image.shape == (1, 32, 32) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0


@pytest.mark.parametrize(
    "extra, in_channels, size",
    [
        ([], 1, 256),  # a user's own grey images (brain slices, films): the paper's size
        ([], 3, 128),  # colour images: HAM10000 lost 2.79 points at 256 px
        (["chest_xray.json"], None, 256),
        (["ham10000_nv_mel.json"], None, 128),
    ],
)
def test_images_2d_reads_grey_images_at_the_papers_size_and_colour_at_128(bundle_root, extra, in_channels, size):
    """The decision of docs/results/images_2d_grey_image_size.json, as the configs resolve it for the network."""
    from scripts.options import config_parser

    configs = [str(bundle_root / "configs" / name) for name in ["train.json", "images_2d.json", *extra]]
    overrides = {"encoder_weights": "none", **({"in_channels": in_channels} if in_channels else {})}
    network = config_parser(configs, overrides).get_parsed_content("network_def")
    assert network.image_size == (size, size)


def test_grid_shift_moves_the_image_by_whole_pixels_and_reflects_the_border():
    """``GridShiftd`` shows the encoder the same image at another phase of its sampling grid."""
    image = torch.arange(2 * 5 * 6, dtype=torch.float32).view(2, 5, 6)
    moved = GridShiftd("image")({"image": image, "grid_shift": [2, 1]})["image"]
    assert torch.equal(moved[:, 1:, 2:], image[:, :-1, :-2])  # the content, two pixels right and one down
    assert torch.equal(moved[:, 0, 2:], image[:, 1, :-2])  # the top row reflected from the row below the edge
    assert torch.equal(moved[:, 1:, 0], image[:, :-1, 2])  # the left column reflected likewise
    assert GridShiftd("image")({"image": image})["image"] is image  # no grid_shift: phase 0, untouched
    with pytest.raises(ValueError, match="less than their size"):
        GridShiftd("image")({"image": image, "grid_shift": [6, 0]})


def test_training_items_at_four_grid_phases_are_each_item_shifted_by_half_the_stride():
    items = [{"image": "a.png", "label": 0}, {"image": "b.png", "label": 0}]
    assert with_grid_phases(items, 1) is items
    phased = with_grid_phases(items, 4)
    half = STRIDE // 2
    assert [(item["image"], item["grid_shift"]) for item in phased] == [
        (name, shift) for shift in ([0, 0], [half, 0], [0, half], [half, half]) for name in ("a.png", "b.png")
    ]
    assert "grid_shift" not in items[0]  # the datalist's own items are left as they were
    with pytest.raises(ValueError, match=r"train_grid_phases must be one of \(1, 4\), got 2"):
        with_grid_phases(items, 2)


def test_train_grid_phases_feeds_training_each_item_at_four_phases_and_leaves_validation_alone(
    bundle_root, tiny_dataset
):
    """The config's wiring: four times the training items, each shifted to its phase before the encoder; the
    validation items and their preprocessing as at one phase (so their cached features are shared)."""
    from scripts.options import config_parser

    configs = [str(bundle_root / "configs" / "train.json")]
    base = {"dataset_dir": str(tiny_dataset), "encoder_weights": "none", "image_size": 64}
    one = config_parser(configs, base)
    four = config_parser(configs, {**base, "train_grid_phases": 4})
    items = one.get_parsed_content("train#phased_data")
    phased = four.get_parsed_content("train#phased_data")
    assert len(phased) == 4 * len(items)
    preprocess = four.get_parsed_content("train#preprocessing")
    assert any(isinstance(t, GridShiftd) for t in preprocess.transforms)
    assert not any(isinstance(t, GridShiftd) for t in four.get_parsed_content("validate#preprocessing").transforms)
    half = STRIDE // 2
    plain = one.get_parsed_content("train#preprocessing")(dict(items[0]))["image"]
    shifted = preprocess(dict(phased[len(items)]))["image"]  # the first item at its second phase: half a stride right
    assert phased[len(items)]["grid_shift"] == [half, 0]
    assert torch.equal(torch.as_tensor(shifted)[..., half:], torch.as_tensor(plain)[..., :-half])
