"""The comparison methods (issue 17): each trains briefly on the tiny synthetic set through the bundle's own
workflows and is evaluated by ``evaluate.json``; its model file says which method it holds, so the network rebuilt
from the file scores the test images exactly as evaluation did. Bad settings are refused before training, naming
the key; an unknown method lists the known ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import bundle_workflow, tiny_run_override
from monai.utils import convert_to_tensor
from scripts import ablations
from scripts.baselines import METHODS, method_class
from scripts.baselines.patchcore import greedy_coreset
from scripts.model_file import ModelMismatchError, network_from_file, read_description

# short budgets: one epoch each, the GAN phase of f-AnoGAN included
FAST = {
    "patchcore": {},
    "differnet": {},
    "ganomaly": {"gan_image_size": 32},
    "f_anogan": {"gan_image_size": 32, "gan_epochs": 1},
}
METHOD_OF_CONFIG = {"patchcore": "patchcore", "differnet": "differnet", "ganomaly": "ganomaly", "f_anogan": "f-anogan"}


@pytest.mark.parametrize("name", list(FAST))
def test_method_trains_evaluates_and_its_model_file_scores_alike(name, bundle_root, tiny_dataset, tmp_path):
    override = {**tiny_run_override(bundle_root, tiny_dataset, tmp_path), **FAST[name]}
    configs = ["train.json", f"baseline_{name}.json"]
    for extra in ([], ["evaluate.json"]):
        workflow = bundle_workflow(bundle_root, configs + extra, "train", **override)
        workflow.run()
        workflow.finalize()
    model_file = tmp_path / "models" / "model.pt"
    method = METHOD_OF_CONFIG[name]
    assert read_description(model_file)["method"] == method
    network = network_from_file(model_file).eval()
    assert type(network) is method_class(method)
    assert torch.isfinite(network.scorer.threshold) and torch.isfinite(network.scorer.pixel_threshold)

    with open(tmp_path / "eval" / "test_scores.csv") as f:
        evaluated = {row["name"]: float(row["score"]) for row in csv.DictReader(f)}
    assert len(evaluated) > 1 and len(set(evaluated.values())) > 1  # the scores tell images apart
    loader = workflow.parser.get_parsed_content("validate#dataloader")
    batch = next(iter(loader))
    images = convert_to_tensor(batch["image"], track_meta=False)
    with torch.no_grad():
        rescored = network.score(images)["score"]
    names = [f"{n}#slice={int(s)}" for n, s in zip(batch["image"].meta["filename_or_obj"], batch["slice"])]
    expected = torch.tensor([evaluated[n] for n in names])
    torch.testing.assert_close(rescored, expected, rtol=1e-4, atol=1e-4)

    # the inference workflow (what MONAI Deploy and MONAI Label run) on the test volumes scores them alike
    infer = {k: override[k] for k in ("bundle_root", "ckpt_dir")}
    infer.update(dataset_dir=str(tiny_dataset / "volumes"), input_glob="test_*_flair.nii.gz", output_dir=str(tmp_path))
    workflow = bundle_workflow(bundle_root, ["inference.json"], "infer", **infer)
    workflow.run()
    workflow.finalize()
    with open(tmp_path / "scores.csv") as f:
        inferred = {Path(row["name"]).name: float(row["score"]) for row in csv.DictReader(f)}
    shared = sorted(set(inferred) & {Path(name).name for name in evaluated})
    assert shared
    by_name = {Path(name).name: value for name, value in evaluated.items()}
    for name in shared:
        assert inferred[name] == pytest.approx(by_name[name], rel=1e-4, abs=1e-4), name


def test_patchcore_memory_bank_is_a_coreset_kept_in_the_model_file(bundle_root, tiny_dataset, tmp_path):
    override = {**tiny_run_override(bundle_root, tiny_dataset, tmp_path), "coreset_ratio": 0.25}
    workflow = bundle_workflow(bundle_root, ["train.json", "baseline_patchcore.json"], "train", **override)
    workflow.run()
    workflow.finalize()
    trained = workflow.parser.get_parsed_content("network")
    patches_per_image = (override["image_size"] // 16) ** 2
    n_train = len(workflow.parser.get_parsed_content("train#dataset"))
    assert len(trained.memory_bank) == round(0.25 * n_train * patches_per_image)
    loaded = network_from_file(tmp_path / "models" / "model.pt")
    torch.testing.assert_close(loaded.memory_bank, trained.memory_bank)


def test_greedy_coreset_covers_every_cluster():
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=generator) for c in centres])
    chosen = greedy_coreset(points, 3, projection_dim=8)
    assert sorted(int(i) // 50 for i in chosen) == [0, 1, 2]


def test_unknown_method_lists_the_known_ones(bundle_root, tmp_path):
    with pytest.raises(ValueError, match="known methods: ae-flow, patchcore"):
        method_class("padim")
    with pytest.raises(SystemExit):
        ablations.main(["compare", "--output", str(tmp_path), "--methods", "patchcore", "padim"])
    assert set(METHODS) - {"ensemble"} <= set(ablations.METHOD_CONFIGS)  # an ensemble is assembled, not a row
    for files in ablations.METHOD_CONFIGS.values():
        assert all((bundle_root / "configs" / file).is_file() for file in files)


@pytest.mark.parametrize("name", ["ganomaly", "f_anogan"])
def test_gan_size_the_generator_cannot_produce_is_refused_before_training(name, bundle_root, tiny_dataset, tmp_path):
    override = {**tiny_run_override(bundle_root, tiny_dataset, tmp_path), "gan_image_size": 48}
    with pytest.raises(RuntimeError) as refused:
        bundle_workflow(bundle_root, ["train.json", f"baseline_{name}.json"], "train", **override)
    assert "gan_image_size 48" in str(refused.value.__cause__ or refused.value)
    assert not (tmp_path / "models").exists()


def test_model_file_of_one_method_is_refused_by_another(tmp_path):
    from scripts.baselines.differnet import DifferNet
    from scripts.baselines.patchcore import PatchCore

    path = tmp_path / "patchcore.pt"
    torch.save(PatchCore(encoder_weights="none", image_size=64).state_dict(), path)
    other = DifferNet(encoder_weights="none", image_size=64)
    with pytest.raises(ModelMismatchError, match="holds a patchcore model, this network is differnet"):
        other.set_extra_state(torch.load(path, weights_only=True)["_extra_state"])


def test_compare_by_method_names_writes_one_table_and_roc_and_resumes(bundle_root, tiny_dataset, tmp_path):
    from conftest import TINY_OVERRIDES

    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    args = ["compare", "--configs", str(bundle_root / "configs" / "train.json"), "--output", str(tmp_path)]
    args += ["--methods", "patchcore", "differnet", *[a for p in sets for a in ("--set", p)]]
    ablations.main(args)
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert list(table) == ["patchcore", "differnet"]
    markdown = (tmp_path / "comparison.md").read_text().splitlines()
    assert markdown[0].startswith("| method | validation_auc | test_auc |") and len(markdown) == 4
    assert f"{100 * table['differnet']['paper_protocol']['auc']:.2f}" in markdown[3]
    assert (tmp_path / "comparison_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = tmp_path / "patchcore" / "models" / "model.pt"
    written = model.stat().st_mtime_ns
    ablations.main(args)  # the same settings again: both variants are reused, nothing retrained
    assert model.stat().st_mtime_ns == written
    assert json.loads((tmp_path / "comparison.json").read_text()) == table


def test_compare_seeds_rescores_a_method_without_an_encoder(bundle_root, tiny_dataset, tmp_path):
    """``compare --seeds`` keeps each seed's validation scores of the kept model; f-AnoGAN reads images, not encoder
    features, and its re-scored validation reproduces the kept epoch's AUC."""
    from conftest import TINY_OVERRIDES
    from sklearn.metrics import roc_auc_score

    sets = [f"{key}={json.dumps(value)}" for key, value in TINY_OVERRIDES.items()]
    sets.append(f"dataset_dir={json.dumps(str(tiny_dataset))}")
    args = ["compare", "--configs", str(bundle_root / "configs" / "train.json"), "--output", str(tmp_path)]
    ablations.main([*args, "--seeds", "0", "--methods", "f-anogan", *[a for p in sets for a in ("--set", p)]])
    row = json.loads((tmp_path / "comparison.json").read_text())["f-anogan"]
    scores = row["validation_scores"]
    assert roc_auc_score(scores["labels"], scores["values"][0]) == pytest.approx(row["validation_auc"]["values"][0])


def test_ganomaly_restarts_a_collapsed_discriminator_without_stepping_it():
    from unittest import mock

    from scripts.baselines import ganomaly

    torch.manual_seed(0)
    network = ganomaly.GANomaly(image_size=64, gan_image_size=32)
    images = torch.rand(4, 1, 64, 64)
    assert network.discriminator_losses(images)["loss"] > ganomaly.COLLAPSED_D_LOSS
    before = [p.detach().clone() for p in network.discriminator_parameters()]
    perfect = torch.tensor(0.0, requires_grad=True)  # a discriminator that tells real from fake with certainty
    with mock.patch.object(ganomaly.F, "binary_cross_entropy_with_logits", return_value=perfect):
        assert network.discriminator_losses(images) is None  # nothing to step on
    after = list(network.discriminator_parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after) if b.ndim > 1)  # re-initialised
