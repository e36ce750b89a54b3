"""The model-zoo's premerge checks (scripts/zoo_checks.py, also run by .ci/run) on this bundle, and the shipped
``models/model.pt`` against the ``eval_metrics`` its metadata claims."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from conftest import SHARED, bundle_workflow
from scripts import zoo_checks

SCHEMA = SHARED / "schemas" / "meta_schema_20240725.json"


def test_required_files_are_present(bundle_root):
    assert zoo_checks.missing_files(bundle_root, zoo_checks.REQUIRED_FILES) == []
    assert zoo_checks.missing_files(bundle_root, zoo_checks.PREFERRED_FILES) == []


def test_version_must_have_a_changelog_entry(bundle_root, tmp_path):
    version = zoo_checks.check_version_in_changelog(bundle_root)
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    assert version == metadata["version"]
    (tmp_path / "configs").mkdir()
    metadata["changelog"].pop(version)
    (tmp_path / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=f"version '{version}' has no entry in 'changelog'"):
        zoo_checks.check_version_in_changelog(tmp_path)


def test_metadata_schema_net_in_out_and_export_reload(bundle_root, tmp_path):
    """All checks in order, the export and reload on the shipped models/model.pt."""
    if not SCHEMA.is_file():
        pytest.skip(f"shared schema not present at {SCHEMA}")
    report = zoo_checks.run_all(bundle_root, SCHEMA)
    assert report["missing_required"] == report["missing_preferred"] == report["skipped"] == []
    assert "inference.json" in report["exported_files"]
    broken = tmp_path / "bundle"
    shutil.copytree(bundle_root / "configs", broken / "configs")
    metadata = json.loads((broken / "configs" / "metadata.json").read_text())
    del metadata["required_packages_version"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="required_packages_version"):
        zoo_checks.check_metadata(broken, SCHEMA)


def _pins(path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, names lower-cased and without extras."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {
        name.split("[")[0].strip().lower(): version.strip()
        for name, _, version in (line.partition("==") for line in lines if "==" in line)
    }


def test_metadata_and_both_requirement_files_pin_the_same_versions(bundle_root):
    """What the bundle declares (metadata.json), installs (requirements.txt) and packages for MONAI Deploy
    (deploy/app/requirements.txt) name one version of every package, so a new dependency cannot be added to one
    list and forgotten in another."""
    metadata = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    declared = {name.lower(): version for name, version in metadata["required_packages_version"].items()}
    declared.update(monai=metadata["monai_version"], torch=metadata["pytorch_version"], numpy=metadata["numpy_version"])
    installed = _pins(bundle_root / "requirements.txt")
    assert installed == {name: declared[name] for name in installed if name in declared}
    assert sorted(set(installed) - set(declared)) == []
    packaged = _pins(bundle_root / "deploy" / "app" / "requirements.txt")
    assert {name: version for name, version in packaged.items() if name in installed} == {
        name: installed[name] for name in packaged if name in installed
    }
    assert "scikit-image" in packaged  # the Deploy app imports the preprocessing, CLAHE mode included


def _assert_reevaluates_to_claims(bundle_root, tmp_path, claim_prefix: str, **override) -> None:
    """``evaluate.json`` on a shipped model gives the ``eval_metrics`` its metadata claims (the model-zoo asks that
    they stay consistent with the weights); the model file supplies every network and preprocessing setting."""
    claimed = json.loads((bundle_root / "configs" / "metadata.json").read_text())["eval_metrics"]
    workflow = bundle_workflow(
        bundle_root,
        ["train.json", "evaluate.json"],
        "train",
        bundle_root=str(bundle_root),
        output_dir=str(tmp_path / "eval"),
        **{"validate#handlers#1#plots": False, **override},
    )
    workflow.run()
    measured = json.loads((tmp_path / "eval" / "test_metrics.json").read_text())["paper_protocol"]
    for name in ("auc", "f1", "acc", "sen", "spe"):
        assert measured[name] == pytest.approx(claimed[f"{claim_prefix}{name}"], abs=5e-3), name


def test_shipped_model_reproduces_its_eval_metrics(bundle_root, tmp_path):
    """The embedded demo's test split is regenerated (deterministic) and the shipped model evaluated on it."""
    _assert_reevaluates_to_claims(
        bundle_root, tmp_path, "synthetic_brain_test_", default_dataset_dir=str(tmp_path / "synthetic_brain")
    )


def test_shipped_chest_xray_model_is_the_recorded_run(bundle_root):
    """``models/chest_xray/model.pt`` is the run of ``docs/results/chest_xray.json`` (same md5), its metadata
    ``eval_metrics`` are that record's test numbers, and it is the documented design: the ensemble of a Lite0 and a
    Lite2 AE-FLOW model at 256 x 256 on 2D images, with the recorded calibration."""
    from scripts.model_file import network_from_file

    record = json.loads((bundle_root / "docs" / "results" / "chest_xray.json").read_text())
    model_file = bundle_root / "models" / "chest_xray" / "model.pt"
    assert hashlib.md5(model_file.read_bytes()).hexdigest() == record["model_md5"]
    claimed = json.loads((bundle_root / "configs" / "metadata.json").read_text())["eval_metrics"]
    for name in ("auc", "f1", "acc", "sen", "spe"):
        assert claimed[f"chest_xray_test_{name}"] == round(record["test"]["paper_protocol"][name], 4), name
    network = network_from_file(model_file)
    assert network.method == "ensemble" and network.input_spec["kind"] == "image"
    assert network.input_spec["intensity"] == {"mode": "histogram", "num_bins": 256}  # chosen on validation, 0.12.0
    assert [member.settings["encoder"] for member in network.members] == ["efficientnet-lite0", "efficientnet-lite2"]
    for member in network.members:
        assert member.method == "ae-flow" and member.settings["image_size"] == [256, 256]
        assert member.settings["subnet"] == "resnet" and member.settings["feature_norm"] == "layernorm"
    assert len(record["settings"]["ensemble_members"]) == 2
    assert network.scorer.beta == record["scorer"]["beta"]
    assert float(network.scorer.threshold) == pytest.approx(record["scorer"]["threshold"])
    # the single Lite0 model (half the inference time) is the run of its own record
    single = json.loads((bundle_root / "docs" / "results" / "chest_xray_lite0.json").read_text())
    single_file = bundle_root / "models" / "chest_xray_lite0" / "model.pt"
    assert hashlib.md5(single_file.read_bytes()).hexdigest() == single["model_md5"]


CHEST_XRAY = SHARED / "data" / "chest_xray_kermany"


@pytest.mark.skipif(not CHEST_XRAY.is_dir(), reason=f"the shared Chest X-ray data is not at {CHEST_XRAY}")
def test_shipped_chest_xray_model_re_evaluates_to_its_eval_metrics_with_no_override(bundle_root, tmp_path):
    """The README's command, with no size, subnet or 2D setting: the model file supplies them (about a minute)."""
    from scripts.adapters.cli import main as adapters

    datalist = tmp_path / "chest_xray" / "datalist.json"
    adapters(["image-folder", "--root", str(CHEST_XRAY), "--normal", "NORMAL", "--output", str(datalist)])
    _assert_reevaluates_to_claims(
        bundle_root,
        tmp_path,
        "chest_xray_test_",
        dataset_dir=str(datalist.parent),
        ckpt_dir=str(bundle_root / "models" / "chest_xray"),
        **{"validate#handlers#1#protocol_folds": 0},
    )


def test_the_zoo_unit_test_pattern_runs_from_another_directory(bundle_root, tmp_path):
    """The model-zoo runs bundles from its own root: a fresh interpreter elsewhere, with nothing of the bundle on
    its path, trains one epoch, evaluates and infers through ``ConfigWorkflow`` with ``bundle_root`` only."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = bundle_root / "tests" / "zoo_unit_test_pattern.py"
    done = subprocess.run(
        [sys.executable, str(script), str(bundle_root), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["inferred"] == ["test_000_flair_scores.json", "test_004_flair_scores.json"]
    assert 0.0 <= result["test_auc"] <= 1.0


def test_a_bundle_without_a_model_passes_and_a_schema_that_does_not_exist_fails(bundle_root, tmp_path, capsys):
    """Without ``models/model.pt`` the checks run, skip the export and say so (``--strict`` fails); a ``--schema``
    path that does not exist is an error, with or without ``--strict``, never a skipped check."""
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in zoo_checks.REQUIRED_FILES:
        shutil.copyfile(bundle_root / name, bundle / name)
    assert zoo_checks.main(["--bundle_root", str(bundle)]) == 0
    printed = capsys.readouterr().out
    assert "MISSING preferred bundle file: models/model.pt" in printed and "model-zoo checks passed" in printed
    assert zoo_checks.main(["--bundle_root", str(bundle), "--strict"]) == 1
    for strict in ([], ["--strict"]):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            zoo_checks.main(["--bundle_root", str(bundle), "--schema", str(tmp_path / "missing.json"), *strict])
