"""One command for a clean runtime bundle: what MONAI Deploy, MONAI Label or a model-zoo release receives.

It holds the runtime modules of ``scripts/`` (not the experiment tooling: ablations, benchmarks, memory and zoo
checks, dataset adapters), ``configs/``, one model file as ``models/model.pt``, ``LICENSE`` and the model card.
Its ``configs/metadata.json`` describes that model, read from the file itself (image size, channels, input kind)
and the modality given here, with the output as Deploy and Label receive it (``runtime_metadata``), and what
validation chose for it (``calibration``: beta, image-level reduction, image and pixel thresholds), so that an
export made from the runtime bundle (docs/deploy.md) carries the model's own metadata.

    python -m scripts.package --output dist/aeflow_anomaly
    python -m scripts.package --model models/chest_xray/model.pt --modality DX --output dist/aeflow_chest_xray
    python -m scripts.package --output dist/aeflow_anomaly_torch --encoder-runtime torch

``--encoder-runtime`` writes the packaged ``inference.json``'s ``encoder_runtime``, which Deploy and Label read
(default ``auto``: the frozen encoder on ONNX Runtime on a CPU, on PyTorch on a GPU; ``torch`` or ``onnxruntime``
force one; docs/README.md, "Speed and scale").
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT_TOOLING = ("ablations.py", "benchmark.py", "memory_check.py", "zoo_checks.py", "package.py", "adapters")
DOCS = ("README.md", "data_license.txt", "deploy.md")


def runtime_metadata(metadata: dict, description: dict, modality: str | None) -> dict:
    """The bundle's metadata with the input and output shapes of the model described, and ``outputs.pred`` as
    Deploy and Label receive it: the postprocessed 0/1 mask, whose ``channel_def`` names label 1 "anomaly" (MONAI
    Label's label list, Deploy's port). The repository's own metadata describes the network's float map there,
    which is what the model-zoo's ``verify_net_in_out`` checks."""
    metadata = json.loads(json.dumps(metadata))
    network = description["network"]
    formats = metadata["network_data_format"]
    image = formats["inputs"]["image"]
    image.update(num_channels=network["in_channels"], spatial_shape=list(network["image_size"]))
    image["channel_def"] = {"0": "image"} if network["in_channels"] == 1 else {"0": "R", "1": "G", "2": "B"}
    if modality:
        image["modality"] = modality
    volume = description["input_spec"]["kind"] == "volume"
    formats["post_processed_outputs"]["pred"]["spatial_shape"] = ["*", "*", "*"] if volume else ["*", "*"]
    formats["outputs"]["pred"] = json.loads(json.dumps(formats["post_processed_outputs"]["pred"]))
    return metadata


def build(
    output: str | Path, model: str | Path | None = None, modality: str | None = None, encoder_runtime: str | None = None
) -> Path:
    """Write the runtime bundle to ``output`` (which must not exist yet); returns its path."""
    from .encoders import checked_runtime
    from .model_file import calibration, read_description

    if encoder_runtime is not None:
        checked_runtime(encoder_runtime)

    output, model = Path(output), Path(model or BUNDLE_ROOT / "models" / "model.pt")
    if output.exists():
        raise FileExistsError(f"{output} exists; remove it or choose another --output.")
    description = read_description(model)  # refuses a file that does not describe itself, before writing
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", *EXPERIMENT_TOOLING)
    shutil.copytree(BUNDLE_ROOT / "scripts", output / "scripts", ignore=ignore)
    shutil.copytree(BUNDLE_ROOT / "configs", output / "configs")
    (output / "models").mkdir()
    shutil.copy(model, output / "models" / "model.pt")
    shutil.copy(BUNDLE_ROOT / "LICENSE", output / "LICENSE")
    (output / "docs").mkdir()
    for name in DOCS:
        shutil.copy(BUNDLE_ROOT / "docs" / name, output / "docs" / name)
    metadata_file = output / "configs" / "metadata.json"
    metadata = runtime_metadata(json.loads(metadata_file.read_text()), description, modality)
    metadata["calibration"] = calibration(model)  # what validation chose: beta, reduction, the two thresholds
    metadata_file.write_text(json.dumps(metadata, indent=4) + "\n")
    if encoder_runtime is not None:
        inference_file = output / "configs" / "inference.json"
        inference = json.loads(inference_file.read_text())
        inference["encoder_runtime"] = encoder_runtime
        inference_file.write_text(json.dumps(inference, indent=4) + "\n")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the bundle folder to create, e.g. dist/aeflow_anomaly")
    parser.add_argument("--model", help="the model file to ship (default: models/model.pt)")
    parser.add_argument("--modality", help="DICOM modality of the model's input, e.g. MR, DX, CR, XC")
    parser.add_argument(
        "--encoder-runtime", help="the packaged inference's encoder_runtime: auto (the default), torch or onnxruntime"
    )
    args = parser.parse_args(argv)
    try:
        print(build(args.output, args.model, args.modality, args.encoder_runtime))
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
