"""Memory under load: run the bundle's inference config over N and then factor x N generated volumes and report
the peak resident memory of each run; with bounded memory the two peaks match however long the list.

    python -m scripts.memory_check --count 500 --factor 4 --workdir /tmp/aeflow_memory

It needs no data and no trained model: the inputs are small synthetic volumes, and the network's weights are its
random initialisation (memory does not depend on their values). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _inputs(folder: Path, count: int, shape=(48, 48, 4)) -> Path:
    """``count`` distinct files (one volume, copied): reading them costs as much as reading distinct volumes."""
    folder.mkdir(parents=True, exist_ok=True)
    from .synthetic import synthetic_volume

    volume, _ = synthetic_volume(np.random.default_rng(0), lesion=True, shape=shape)
    first = folder / "case_00000.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), first)
    for index in range(1, count):
        shutil.copyfile(first, folder / f"case_{index:05d}.nii.gz")
    return folder


def _workflow(bundle_root: Path, inputs: Path, out: Path, override: dict):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(bundle_root / "configs" / "inference.json"),
        workflow_type="infer",
        bundle_root=str(bundle_root),
        dataset_dir=str(inputs),
        input_glob="case_*.nii.gz",
        output_dir=str(out),
        **override,
    )
    workflow.initialize()
    return workflow


def measure(bundle_root: str | os.PathLike, workdir: str | os.PathLike, count: int, factor: int = 4, **override):
    """Peak RSS (MiB) after inference over ``count`` inputs, then after ``factor * count`` inputs."""
    bundle_root, workdir = Path(bundle_root), Path(workdir)
    from .networks import AEFlow

    ckpt_dir = workdir / "models"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    network = AEFlow(image_size=64, flow_blocks=2, encoder_weights="none")  # memory, not scores, is measured
    network.scorer.threshold.fill_(0.0)
    network.scorer.pixel_threshold.fill_(3.0)
    torch.save(network.state_dict(), ckpt_dir / "model.pt")
    result = {"count": count, "factor": factor}
    for name, n in (("small", count), ("large", count * factor)):
        inputs = _inputs(workdir / f"inputs_{name}", n)
        workflow = _workflow(bundle_root, inputs, workdir / f"out_{name}", {**override, "ckpt_dir": str(ckpt_dir)})
        start = time.perf_counter()
        workflow.run()
        workflow.finalize()
        result[name] = {
            "inputs": n,
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(_peak_rss_mib(), 1),
            "rss_after_mib": round(_rss_mib(), 1),
        }
        shutil.rmtree(workdir / f"out_{name}")  # the written maps are not what is measured
        shutil.rmtree(inputs)
    result["peak_growth_mib"] = round(result["large"]["peak_rss_mib"] - result["small"]["peak_rss_mib"], 1)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="inputs in the first run")
    parser.add_argument("--factor", type=int, default=4, help="the second run has factor x count inputs")
    parser.add_argument("--workdir", default="eval/memory_check", help="scratch folder (inputs, model, maps)")
    parser.add_argument("--bundle_root", default=str(Path(__file__).resolve().parents[1]))
    args = parser.parse_args(argv)
    result = measure(args.bundle_root, args.workdir, args.count, args.factor)
    print(json.dumps(result, indent=4))
    return result


if __name__ == "__main__":
    main()
