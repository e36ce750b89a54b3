"""Side-by-side speed of AE-FLOW on this machine: training images/s with the encoder run every step (naive)
versus from cached features (float32, and under ``train_amp``'s autocast: bfloat16 on a CPU, float16 on CUDA),
the one-off encoding rate, inference images/s (float32, and bf16 autocast on CPU),
and peak resident memory, for each encoder at the paper's 256 x 256, on the same images.

    python -m scripts.benchmark --encoders efficientnet-lite0 wide_resnet50_2 --output docs/benchmarks
    python -m scripts.benchmark --folder ../shared/data/chest_xray_kermany/test --input-glob "*/*.jpeg" \
        --model-dir models/chest_xray_lite0 --settings 1x0 8x0:onnxruntime

Each encoder is measured in its own process so that its peak memory is its own. Speed does not depend on the
weights' values, so Wide-ResNet-50-2 is timed with random weights when its ImageNet file is not available (said
in the output). Writes ``<output>/<machine>.json`` and the table in ``<output>.md``. ``--folder`` times the
inference workflow end to end on a folder at several batch sizes and worker counts
(``<output>/<machine>_folder_inference.json``), and with ``--peer-model-dir`` a second model (the patch
nearest-neighbour peer, PatchCore) on the same folder in the same run. Both warn when the machine's load average
says it is busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from .encoders import checked_runtime


def machine() -> dict:
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _rate(step, images_per_step: int, repeats: int, device: torch.device) -> float:
    step()  # warm-up: allocations, kernels
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images_per_step * repeats / (time.perf_counter() - started)


def measure(encoder: str, image_size: int, batch_size: int, repeats: int, device: str) -> dict:
    """All rates for one encoder, in this process."""
    from .encoders import EncoderWeightsUnavailable
    from .losses import AEFlowLoss
    from .networks import AEFlow

    device = torch.device(device)
    try:
        network, weights = AEFlow(encoder=encoder, encoder_weights="imagenet", image_size=image_size), "imagenet"
    except EncoderWeightsUnavailable:
        network, weights = (
            AEFlow(encoder=encoder, encoder_weights="none", image_size=image_size),
            "random (timing only)",
        )
    network.to(device)
    loss_functions = {"mse": AEFlowLoss(alpha=0.5), "ssim": AEFlowLoss(alpha=0.5, recon_loss="ssim")}
    optimizer = torch.optim.Adam(network.trainable_parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 1, image_size, image_size, generator=generator).to(device)
    with torch.no_grad():
        features = network.encoder(images)

    def train_step(cached: bool, recon_loss: str = "mse", autocast: bool = False):
        network.train()  # as AEFlowTrainer runs it: the network under autocast, equation (1) in float32
        with torch.autocast(device.type, enabled=autocast):
            out = network(images, features if cached else None)
        loss = loss_functions[recon_loss](*(part.float() for part in out), images)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer(autocast: bool):
        network.eval()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            network(images)

    @torch.no_grad()
    def encode():
        network.encoder(images)

    result = {"encoder": encoder, "weights": weights, "image_size": image_size, "batch_size": batch_size}
    result["train_naive_images_per_s"] = _rate(lambda: train_step(False), batch_size, repeats, device)
    result["train_cached_images_per_s"] = _rate(lambda: train_step(True), batch_size, repeats, device)
    result["train_cached_ssim_images_per_s"] = _rate(lambda: train_step(True, "ssim"), batch_size, repeats, device)
    for loss_name, key in (("mse", "train_cached_amp_images_per_s"), ("ssim", "train_cached_ssim_amp_images_per_s")):
        result[key] = _rate(lambda: train_step(True, loss_name, autocast=True), batch_size, repeats, device)
    result["encode_images_per_s"] = _rate(encode, batch_size, repeats, device)
    result["inference_images_per_s"] = _rate(lambda: infer(False), batch_size, repeats, device)
    result["inference_bf16_images_per_s"] = _rate(lambda: infer(True), batch_size, repeats, device)
    with torch.no_grad():
        network.eval()
        reference = network(images)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = network(images).float()
    result["bf16_max_abs_map_difference"] = float((reference - low).abs().max())
    result["cached_speed_up"] = result["train_cached_images_per_s"] / result["train_naive_images_per_s"]
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def folder_setting(text: str) -> tuple[int, int, str]:
    """``BATCHxWORKERS[:RUNTIME]`` (``16x2``, ``1x0:onnxruntime``): batch size, decoding workers, encoder runtime."""
    sizes, _, runtime = text.partition(":")
    try:
        batch_size, workers = (int(v) for v in sizes.split("x"))
    except ValueError:
        raise ValueError(
            f"--settings takes BATCHxWORKERS[:RUNTIME], e.g. 1x0 or 16x2:onnxruntime; got {text!r}."
        ) from None
    try:
        return batch_size, workers, checked_runtime(runtime or "auto")
    except ValueError as error:
        raise ValueError(f"--settings {text!r}: {error}") from None


def folder_auc(scores: dict[str, float], normal: str) -> float:
    """ROC AUC of scores keyed by file path, the files in a folder named ``normal`` normal and all others
    abnormal (the class-folder layout of ``--input-glob "*/*.jpeg"``): a speed setting must keep it."""
    from sklearn.metrics import roc_auc_score

    labels = [int(Path(name).parent.name != normal) for name in scores]
    if len(set(labels)) < 2:
        raise ValueError(f"--normal {normal!r}: the scored files need both a folder of that name and another one.")
    return float(roc_auc_score(labels, list(scores.values())))


def folder_inference(
    model_dir: str,
    folder: str,
    settings: list[tuple[int, int, str]],
    output: Path,
    input_glob: str | None = None,
    normal: str | None = None,
) -> list[dict]:
    """What users run: ``configs/inference.json`` on a folder (decode, preprocessing, network, score, writing maps
    and masks), timed from the first batch to the last output, once per (batch_size, num_workers, encoder_runtime);
    imports and model loading are left out and reported apart. The scores of every setting are compared with the
    first's, and with ``normal`` (the normal class's folder name) each setting's AUC is reported. ``input_glob``
    (e.g. ``*/*.jpeg``: every class folder of a split) replaces the config's file pattern."""
    import csv

    from .engines import bundle_workflow

    root = Path(__file__).resolve().parents[1]
    rows, reference = [], None
    for batch_size, workers, runtime in settings:
        out = output / f"batch{batch_size}_workers{workers}_{runtime}"
        started = time.perf_counter()
        workflow = bundle_workflow(
            root,
            [root / "configs" / "inference.json"],
            "infer",
            ckpt_dir=model_dir,
            dataset_dir=folder,
            output_dir=f"$'{out}'",
            batch_size=batch_size,
            num_workers=workers,
            encoder_runtime=runtime,
            **({"input_glob": input_glob} if input_glob else {}),
        )
        loaded = time.perf_counter()
        workflow.run()
        finished = time.perf_counter()
        workflow.finalize()
        with open(out / "scores.csv") as f:
            scores = {r["name"]: float(r["score"]) for r in csv.DictReader(f)}
        reference = reference or scores
        rows.append(
            {
                "batch_size": batch_size,
                "num_workers": workers,
                "encoder_runtime": runtime,
                "images": len(scores),
                "setup_s": round(loaded - started, 1),
                "run_s": round(finished - loaded, 1),
                "images_per_s": len(scores) / (finished - loaded),
                "max_score_difference": max(abs(scores[k] - reference[k]) for k in reference),
            }
        )
        if normal is not None:
            rows[-1]["auc"] = folder_auc(scores, normal)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _table(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, torch {report['machine']['torch']}"
        + (f", {report['machine']['cuda']}" if report["machine"]["cuda"] else ", CPU only")
        + f"; {report['date']}.",
        "",
        "| encoder | weights | train naive (img/s) | train cached (img/s) | speed-up | train cached, SSIM loss (img/s) "
        "| train cached, train_amp: MSE / SSIM (img/s) "
        "| encode (img/s) | inference fp32 (img/s) | inference bf16 (img/s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['encoder']} | {r['weights']} | {r['train_naive_images_per_s']:.1f} | "
            f"{r['train_cached_images_per_s']:.1f} | {r['cached_speed_up']:.1f}x | "
            f"{r.get('train_cached_ssim_images_per_s', float('nan')):.1f} | "
            f"{r.get('train_cached_amp_images_per_s', float('nan')):.1f} / "
            f"{r.get('train_cached_ssim_amp_images_per_s', float('nan')):.1f} | {r['encode_images_per_s']:.1f} | "
            f"{r['inference_images_per_s']:.1f} | {r['inference_bf16_images_per_s']:.1f} | {r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", nargs="+", default=["efficientnet-lite0", "wide_resnet50_2"])
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="docs/benchmarks")
    parser.add_argument("--machine-name", default=platform.node() or "machine")
    parser.add_argument("--folder", help="time configs/inference.json end to end on this folder of images instead")
    parser.add_argument("--model-dir", default="models/chest_xray", help="--folder: the folder of model.pt")
    parser.add_argument(
        "--input-glob", help="--folder: the files to score (default: the config's); */*.jpeg: subfolders"
    )
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["1x0", "16x0", "16x2"],
        help="--folder: BATCHxWORKERS[:RUNTIME] settings to time (RUNTIME: the encoder's; auto, the default, torch "
        "or onnxruntime)",
    )
    parser.add_argument(
        "--peer-model-dir",
        help="--folder: also time this model folder's model.pt at every setting (the patch nearest-neighbour "
        "peer: a PatchCore model from `scripts.ablations compare --methods patchcore`), and report the ratio",
    )
    parser.add_argument(
        "--normal", help="--folder: the normal class's subfolder name (e.g. NORMAL): report each setting's AUC too"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one encoder, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.image_size, args.batch_size, args.repeats, args.device)))
        return
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: the 1-minute load average is {load:.1f} on {os.cpu_count()} cores: rates will be low",
            file=sys.stderr,
        )
    if args.folder:
        settings = [folder_setting(setting) for setting in args.settings]
        report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load_1min": load, "folder": args.folder}
        report["model_dir"] = args.model_dir
        report["input_glob"] = args.input_glob
        own_dir = Path("eval") / "benchmark"
        report["results"] = folder_inference(
            args.model_dir, args.folder, settings, own_dir, args.input_glob, args.normal
        )
        if args.peer_model_dir:  # the peer at every setting too, so that each ratio compares like with like
            report["peer_model_dir"] = args.peer_model_dir
            peer_dir = Path("eval") / "benchmark_peer"
            report["peer"] = folder_inference(
                args.peer_model_dir, args.folder, settings, peer_dir, args.input_glob, args.normal
            )
            report["ratio_to_peer"] = [
                own["images_per_s"] / peer["images_per_s"] for own, peer in zip(report["results"], report["peer"])
            ]
        from .reports import write_json

        write_json(Path(args.output) / f"{args.machine_name}_folder_inference.json", report)
        for row in report["results"]:
            print(
                f"batch {row['batch_size']:>3}, workers {row['num_workers']}, encoder on {row['encoder_runtime']}: "
                f"{row['images_per_s']:.1f} images/s "
                f"({row['images']} images in {row['run_s']} s; setup {row['setup_s']} s; "
                f"max score difference {row['max_score_difference']:.1e}"
                + (f"; AUC {100 * row['auc']:.2f}" if "auc" in row else "")
                + ")"
            )
        for row, ratio in zip(report.get("peer", []), report.get("ratio_to_peer", [])):
            print(
                f"peer {args.peer_model_dir}, batch {row['batch_size']}, workers {row['num_workers']}, encoder on "
                f"{row['encoder_runtime']}: {row['images_per_s']:.1f} images/s; this model is {ratio:.2f}x its rate"
            )
        return
    results = []
    for encoder in args.encoders:
        print(f"measuring {encoder} ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "scripts.benchmark", "--one", encoder, "--image-size", str(args.image_size)]
        command += ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--device", args.device]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=1), file=sys.stderr)
    report = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "device": args.device, "results": results}
    write_report(report, Path(args.output), args.machine_name)
    print(_table(report))


def write_report(report: dict, output: Path, machine_name: str) -> None:
    """``<output>/<machine_name>.json``, and this machine's section of the table in ``<output>.md``."""
    from .reports import atomic_path, write_json

    write_json(output / f"{machine_name}.json", report)
    table = Path(f"{output}.md")
    header = "# Benchmarks\n\nWritten by `python -m scripts.benchmark`; one section per machine.\n\n"
    previous = table.read_text() if table.exists() else header
    marker = f"## {machine_name} ({report['device']})\n"
    section = f"{marker}\n{_table(report)}"
    if marker in previous:
        start = previous.index(marker)
        end = previous.find("\n## ", start + 1)
        previous = previous[:start] + section + (previous[end + 1 :] if end != -1 else "")
    else:
        previous = previous.rstrip("\n") + "\n\n" + section
    with atomic_path(table) as tmp:  # another machine's sections are in it: never half-written
        Path(tmp).write_text(previous)


if __name__ == "__main__":
    main()
