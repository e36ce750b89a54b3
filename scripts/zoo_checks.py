"""The MONAI model-zoo's premerge checks, run on this bundle (``ci/verify_bundle.py`` of the model-zoo).

Files (``LICENSE``, ``configs/metadata.json``; "preferred" ``models/model.pt``, ``configs/inference.json``),
``version`` in ``changelog``, ``verify_metadata`` against a local copy of the schema (offline),
``verify_net_in_out`` on ``network_def``, then export and reload. The model-zoo exports with ``torch.jit.script``;
FrEIA's blocks cannot be scripted, so the export here traces (``ckpt_export --use_trace True``), as the README's
export command does. Without ``models/model.pt`` the export uses a randomly initialised checkpoint and says so.

    python -m scripts.zoo_checks --schema ../shared/schemas/meta_schema_20240725.json
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path

REQUIRED_FILES = ("LICENSE", "configs/metadata.json")
PREFERRED_FILES = ("models/model.pt", "configs/inference.json")
logger = logging.getLogger(__name__)


def missing_files(bundle_root: str | Path, files=REQUIRED_FILES + PREFERRED_FILES) -> list[str]:
    return [name for name in files if not (Path(bundle_root) / name).is_file()]


def check_version_in_changelog(bundle_root: str | Path) -> str:
    """Return the version; fail when it is absent or has no changelog entry (model-zoo step d)."""
    meta_file = Path(bundle_root) / "configs" / "metadata.json"
    metadata = json.loads(meta_file.read_text())
    version = metadata.get("version")
    if not version:
        raise ValueError(f"{meta_file} has no 'version'.")
    if version not in metadata.get("changelog", {}):
        raise ValueError(f"{meta_file}: version {version!r} has no entry in 'changelog'; add one when bumping it.")
    return version


def check_metadata(bundle_root: str | Path, schema_file: str | Path) -> None:
    """``verify_metadata`` downloads the schema unless ``filepath`` exists, so hand it a copy (offline)."""
    from monai.bundle import verify_metadata

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "schema.json"
        shutil.copyfile(schema_file, local)
        verify_metadata(meta_file=str(Path(bundle_root) / "configs" / "metadata.json"), filepath=str(local))


def check_net_in_out(bundle_root: str | Path, **override) -> None:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(Path(bundle_root) / "configs" / "metadata.json"),
        config_file=str(Path(bundle_root) / "configs" / "inference.json"),
        device="cpu",
        bundle_root=str(bundle_root),
        **override,
    )


def export_and_reload(bundle_root: str | Path, filepath: str | Path, model_file: str | Path, **override):
    """Traced ``ckpt_export`` of ``network_def`` (built from ``model_file``) and ``torch.jit.load`` of the result
    (model-zoo step h, with the TorchScript exclusion: the encoder, FrEIA and the scorer cannot be scripted).

    Returns the reloaded module and the names of the JSON files embedded in it.
    """
    from monai.bundle import ckpt_export
    from monai.data import load_net_with_metadata

    from .model_file import read_description

    root = Path(bundle_root)
    config_file, meta_file = root / "configs" / "inference.json", root / "configs" / "metadata.json"
    override = {"bundle_root": str(root), "model_file": str(model_file), **override}
    network = read_description(model_file)["network"]  # the traced input's shape: the model's own size
    ckpt_export(
        net_id="network_def",
        filepath=str(filepath),
        ckpt_file=str(model_file),
        meta_file=str(meta_file),
        config_file=str(config_file),
        use_trace=True,
        input_shape=[1, network["in_channels"], *network["image_size"]],
        **override,
    )
    network, metadata, extra = load_net_with_metadata(str(filepath), more_extra_files=("inference.json",))
    if metadata.get("version") != json.loads(meta_file.read_text())["version"]:
        raise ValueError(f"{filepath} does not carry the bundle's metadata.")
    return network, sorted(extra)


def run_all(bundle_root: str | Path, schema_file: str | Path | None = None, **override) -> dict:
    """Every check, in the model-zoo's order; a failing check raises. Returns what ran and what was skipped."""
    root = Path(bundle_root)
    report: dict = {"missing_required": [], "missing_preferred": [], "skipped": []}
    report["missing_required"] = missing_files(root, REQUIRED_FILES)
    if report["missing_required"]:
        raise FileNotFoundError(f"Required bundle file(s) missing in {root}: {report['missing_required']}.")
    report["missing_preferred"] = missing_files(root, PREFERRED_FILES)
    report["version"] = check_version_in_changelog(root)
    if schema_file and not Path(schema_file).is_file():  # a mistyped path must not pass as a skipped check
        raise FileNotFoundError(f"The metadata schema {schema_file} does not exist; pass a local meta_schema_*.json.")
    if schema_file:
        check_metadata(root, schema_file)
    else:
        report["skipped"].append("verify_metadata (no --schema given)")
    ckpt = root / "models" / "model.pt"
    if not ckpt.is_file():  # inference builds its network from the model file: nothing to check without one
        report["skipped"].append("verify_net_in_out and export (models/model.pt is absent)")
        return report
    check_net_in_out(root, **override)
    with tempfile.TemporaryDirectory() as tmp:
        _, extra = export_and_reload(root, Path(tmp) / "verify_model.ts", ckpt, **override)
    report["exported_files"] = extra
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle_root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--schema", default=None, help="local copy of the metadata schema (meta_schema_*.json)")
    parser.add_argument("--strict", action="store_true", help="fail when a preferred file (models/model.pt) is missing")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = run_all(args.bundle_root, args.schema)
    for name in report["missing_preferred"]:
        print(f"MISSING preferred bundle file: {name}")
    for what in report["skipped"]:
        print(f"SKIPPED: {what}")
    embedded = ", ".join(report.get("exported_files", [])) or "nothing, not exported"
    print(f"model-zoo checks passed for version {report['version']} (embedded: {embedded})")
    return 1 if args.strict and report["missing_preferred"] else 0


if __name__ == "__main__":
    sys.exit(main())
