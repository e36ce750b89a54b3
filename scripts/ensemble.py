"""Several trained models as one detector (issue 13, item 6): the mean of the members' calibrated scores.

Each member keeps its own calibration (term statistics and beta, from its own training's validation), so its score
and anomaly map are in units of its own normal images' spread; the ensemble averages those, and its own scorer,
fitted on validation like any network's, holds only the ensemble's operating threshold and mask threshold. Validation
supported it on both shared data sets with a Lite0 and a Lite2 member (``docs/results.md``): the two encoders err on
different images, while seeds of one encoder add nothing.

An ensemble file is a model file like any other (``scripts.model_file``): its description lists every member's own
description, and its state dict holds every member's weights and extra state, so evaluation, inference, MONAI
Deploy and MONAI Label build it from the file (``network_from_file``) and score it as they score one network. It is
assembled from trained model files, not trained: ``configs/ensemble.json`` runs the training workflow with nothing
to optimise, and its validation calibrates the ensemble and saves ``models/model.pt``.

All members take the same input (image size, channels and ``input_spec``): one preprocessing feeds them all.
The whole design, the members' trainings, the assembly and the evaluation of each, is one command (finished steps
are reused, a killed training resumes):

    python -m scripts.ensemble --configs configs/train.json configs/images_2d.json configs/chest_xray.json \
        --encoders efficientnet-lite0 efficientnet-lite2 --output runs/chest_ensemble
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .baselines.base import ComparisonMethod, term_maps
from .model_file import DEFAULT_METHOD, ModelMismatchError, check_format, comparable, decode, network_of_description

SHARED_INPUT = ("image_size", "in_channels")


def combined(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's rule, for scores and maps alike: the mean of the members' calibrated values."""
    return torch.stack(list(values)).mean(dim=0)


def _checked_members(members: Sequence[Mapping]) -> list[dict]:
    """Two or more single models' descriptions that take the same input, else a refusal naming what differs."""
    members = [
        {"method": DEFAULT_METHOD, **check_format(decode(member), f"ensemble member {i}")}
        for i, member in enumerate(members)
    ]
    if len(members) < 2:
        raise ValueError(f"An ensemble needs at least two member models, got {len(members)}.")
    if any(member["method"] == Ensemble.method for member in members):
        raise ValueError("An ensemble's members are single models; list the members of a nested ensemble.")
    first = members[0]
    for index, member in enumerate(members[1:], start=1):
        differing = [
            f"{key}: member 0 has {first['network'].get(key)!r}, member {index} has {member['network'].get(key)!r}"
            for key in SHARED_INPUT
            if first["network"].get(key) != member["network"].get(key)
        ]
        if member["input_spec"] != first["input_spec"]:
            differing.append(f"input_spec: member 0 {first['input_spec']}, member {index} {member['input_spec']}")
        if differing:
            raise ModelMismatchError("The ensemble's members must take the same input: " + "; ".join(differing))
    return members


class Ensemble(ComparisonMethod):
    """The mean of the members' calibrated image scores and anomaly maps; its scorer's ``flow`` slot holds that mean
    (beta 1, no further standardisation), so its threshold is in the members' units."""

    method = "ensemble"

    def __init__(
        self,
        members: Sequence[Mapping],
        mask_quantile: float = 0.999,
        image_size: int | Sequence[int] | None = None,
        in_channels: int | None = None,
        beta: float = 1.0,
        score_normalization: str = "none",
        input_spec: dict | None = None,
    ):
        """``members``: the members' model descriptions (``scripts.model_file.read_description``). The other
        settings are what the members and the rule fix; they are accepted, as a model file stores them, and must
        agree."""
        members = _checked_members(members)
        first = members[0]
        fixed = {**{key: first["network"][key] for key in SHARED_INPUT}, "input_spec": first["input_spec"]}
        given = {"image_size": image_size, "in_channels": in_channels, "input_spec": input_spec}
        differing = [
            f"{key} {value!r} (members: {fixed[key]!r})"
            for key, value in given.items()
            if value is not None and comparable(key, value) != comparable(key, fixed[key])
        ]
        if (float(beta), score_normalization) != (1.0, "none"):
            differing.append(f"beta {beta} and score_normalization {score_normalization!r} (the rule: 1.0, 'none')")
        if differing:
            raise ModelMismatchError("An ensemble's settings are its members': " + "; ".join(differing))
        super().__init__(
            image_size=first["network"]["image_size"],
            in_channels=first["network"]["in_channels"],
            beta=1.0,
            score_normalization="none",
            mask_quantile=mask_quantile,
            input_spec=first["input_spec"],
            members=members,
        )
        self.members = nn.ModuleList(network_of_description(member) for member in members)  # weights: the file's
        self.encoder = None  # one frozen encoder per member: no single feature tensor to cache

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        raise TypeError("An ensemble has one encoder per member; it scores images, not cached features.")

    def anomaly_terms(self, image: torch.Tensor, features: torch.Tensor | None):
        if features is not None:
            raise TypeError("An ensemble scores images; run it without a feature cache (cache_features: false).")
        outputs = [member.score(image) for member in self.members]

        def mean(key: str) -> torch.Tensor:
            return combined([output[key] for output in outputs])

        maps = term_maps(image, flow=mean("anomaly_map"), residual=mean("map_residual"))
        terms = {"flow": mean("score"), "recon": image.new_zeros(image.shape[0])}
        return maps, terms, mean("reconstruction")

    def training_losses(self, image: torch.Tensor, features: torch.Tensor | None) -> None:
        return None  # assembled from trained members: nothing to optimise, validation calibrates it


def ensemble_of(model_files: Sequence[str | os.PathLike], mask_quantile: float = 0.999) -> Ensemble:
    """The ensemble of trained model files, each member with its weights and calibration loaded (verified)."""
    from .checkpoints import load_network
    from .model_file import read_description

    if isinstance(model_files, (str, os.PathLike)):
        raise TypeError(f"ensemble_of takes a list of model files, got one path: {model_files}")
    network = Ensemble([read_description(path) for path in model_files], mask_quantile=mask_quantile)
    for member, path in zip(network.members, model_files):
        load_network(member, path)
    return network


DEFAULT_ENCODERS = ("efficientnet-lite0", "efficientnet-lite2")


class MemberDiverged(RuntimeError):
    """A member's training diverged: its folder holds no model of its settings, so no ensemble is assembled."""


def train_ensemble(configs: list[str], overrides: dict, output: Path, encoders: Sequence[str] = DEFAULT_ENCODERS):
    """One member per encoder trained and evaluated with the configs, then their ensemble assembled (calibrated on
    validation) and evaluated; returns each one's validation and test AUC. Each step is a setting folder of
    ``scripts.ablations`` (models/, eval/, settings.json) under ``output``, reused when it finished before; the
    table is also written to ``output/ensemble.json``. A member whose training diverged stops it
    (``MemberDiverged``), naming the member and where it diverged."""
    from . import reports
    from .ablations import check_unique, divergence_text, kept_validation, run_or_reuse

    if len(set(encoders)) < 2:
        raise ValueError(f"An ensemble across encoders needs at least two different encoders, got {list(encoders)}.")
    check_unique("--encoders", encoders)
    output, folders = Path(output), {}
    for encoder in encoders:
        folders[encoder] = output / encoder
        run = run_or_reuse(list(configs), {**overrides, "encoder": encoder}, folders[encoder])
        if "diverged" in run:
            raise MemberDiverged(
                f"The member {encoder} {divergence_text(run['diverged'])} (recorded in "
                f"{folders[encoder] / 'settings.json'}): no ensemble is assembled. Train it with other settings "
                "(a lower learning_rate, or grad_clip_norm) and run again: finished members are reused."
            )
    members = [str(folders[encoder] / "models" / "model.pt") for encoder in encoders]
    folders["ensemble"] = output / "ensemble"
    assembly = str(Path(configs[0]).with_name("ensemble.json"))  # beside the bundle's train.json
    run_or_reuse([*configs, assembly], {**overrides, "ensemble_members": members}, folders["ensemble"])
    table = {}
    for name, folder in folders.items():
        test = json.loads((folder / "eval" / "test_metrics.json").read_text())["paper_protocol"]
        table[name] = {"validation_auc": kept_validation(folder)["paper_protocol"]["auc"], "test_auc": test["auc"]}
        logging.info("%-20s validation AUC %.4f  test AUC %.4f", name, *table[name].values())
    reports.write_json(output / "ensemble.json", table)
    return table


def main(argv: list[str] | None = None) -> int:
    from .ablations import parse_overrides

    parser = argparse.ArgumentParser(prog="python -m scripts.ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="the members' bundle config files, in order")
    parser.add_argument("--encoders", nargs="+", default=list(DEFAULT_ENCODERS), help="one member per encoder")
    parser.add_argument("--output", required=True, help="folder of the members' and the ensemble's runs")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override (JSON value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        train_ensemble(args.configs, parse_overrides(args.set), Path(args.output), args.encoders)
    except MemberDiverged as error:
        print(error, file=sys.stderr)
        return 1
    print(
        f"model: {Path(args.output) / 'ensemble' / 'models' / 'model.pt'}; table: {Path(args.output) / 'ensemble.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
