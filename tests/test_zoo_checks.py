"""The model-zoo's premerge checks (scripts/zoo_checks.py, also run by .ci/run) on this bundle."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import SHARED, TINY_OVERRIDES

from scripts import zoo_checks

SCHEMA = SHARED / "schemas" / "meta_schema_20240725.json"


def test_required_files_are_present(bundle_root):
    assert zoo_checks.missing_files(bundle_root, zoo_checks.REQUIRED_FILES) == []
    assert (bundle_root / "configs" / "inference.json").is_file()
    if zoo_checks.missing_files(bundle_root, ("models/model.pt",)):
        pytest.skip("models/model.pt is missing: the trained weights are not committed yet (preferred file)")


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
    """All checks in order; without models/model.pt the export uses a random checkpoint and reports it."""
    if not SCHEMA.is_file():
        pytest.skip(f"shared schema not present at {SCHEMA}")
    report = zoo_checks.run_all(bundle_root, SCHEMA, flow_blocks=TINY_OVERRIDES["flow_blocks"])
    assert report["missing_required"] == [] and "inference.json" in report["exported_files"]
    assert ("models/model.pt" in report["missing_preferred"]) == (not (bundle_root / "models" / "model.pt").is_file())
    broken = tmp_path / "bundle"
    shutil.copytree(bundle_root / "configs", broken / "configs")
    metadata = json.loads((broken / "configs" / "metadata.json").read_text())
    del metadata["required_packages_version"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(Exception):
        zoo_checks.check_metadata(broken, SCHEMA)
