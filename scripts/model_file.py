"""A trained model file that says what it is: ``models/model.pt`` carries, beside the weights, the network's
settings (encoder, image size, channels, subnet, flow, scorer) and the ``input_spec`` of its preprocessing.

The description is the network's PyTorch "extra state" (``AEFlow.get_extra_state``), a JSON text stored as a uint8
tensor (so every tool that walks a state dict, ONNX's tracer included, meets tensors only). It lives inside the plain
state dict that MONAI's ``CheckpointLoader``, ``ckpt_export``, MONAI Deploy and MONAI Label load, and every one of
them checks it: loading the file into a network built with other settings raises ``ModelMismatchError`` naming
each setting with both values. The calibrated parts of the scorer (term statistics, beta, image and pixel
thresholds) are buffers in the same state dict.

Evaluation and inference build the network from the file (``network_from_file``); a setting passed explicitly
(``expect``, e.g. an ``--image_size`` on the command line) must agree with the file. Commands:

    python -m scripts.model_file describe models/model.pt
    python -m scripts.model_file upgrade OLD.pt --output NEW.pt --config_file configs/train.json [--set k=v ...]
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys
from typing import Mapping

import torch

from .options import flag

MODEL_FORMAT = "aeflow-model"
FORMAT_VERSION = 1
EXTRA_STATE_KEY = "_extra_state"
# how the encoder got its weights before the file's own were loaded: not a property of the trained model
NOT_COMPARED = ("encoder_weights",)
# settings that live in the stored input_spec, by their config key
INPUT_SPEC_SETTINGS = {"image_intensity": "intensity", "slice_axis": "slice_axis"}
# settings validation may change at calibration: compared with what the model scores with (``calibrated_mismatch``)
CALIBRATED_SETTINGS = ("beta", "score_reduction")


class ModelMismatchError(ValueError):
    """A model file that does not describe the network or the settings it is asked to serve."""


DEFAULT_METHOD = "ae-flow"  # files written before comparison methods existed hold AE-FLOW


def describe(settings: Mapping, input_spec: Mapping, method: str = DEFAULT_METHOD) -> dict:
    return {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "method": method,
        "network": json.loads(json.dumps(dict(settings))),
        "input_spec": json.loads(json.dumps(dict(input_spec))),
    }


def encode(description: Mapping) -> torch.Tensor:
    return torch.tensor(list(json.dumps(description, sort_keys=True).encode()), dtype=torch.uint8)


def decode(state) -> dict:
    """The description from its stored form (a uint8 tensor of JSON text)."""
    if isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.ndim == 1:
        try:
            return json.loads(bytes(state.tolist()).decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelMismatchError(f"the model description in the file is damaged: {error}") from error
    return state


def comparable(key: str, value):
    """The form a setting is stored in: ``image_size`` 256 is [256, 256], an ``input_spec`` and an intensity have
    their defaults."""
    from .preprocessing import INTENSITY_DEFAULTS, resolve_spec

    if key == "image_size" and isinstance(value, (int, float)):
        value = [int(value)] * 2
    elif key == "input_spec" and isinstance(value, Mapping):
        value = resolve_spec(value)
    elif key == "image_intensity" and isinstance(value, Mapping):
        value = {**INTENSITY_DEFAULTS.get(value.get("mode"), {}), **value}
    return json.loads(json.dumps(value))  # tuples and lists, ints and floats compare as JSON does


def stored_settings(saved: Mapping) -> dict:
    """A description's settings by config key: the network's, its ``input_spec`` and the settings inside that."""
    spec = saved.get("input_spec") or {}
    inside = {key: spec[name] for key, name in INPUT_SPEC_SETTINGS.items() if name in spec}
    return {**saved.get("network", {}), **inside, "input_spec": saved.get("input_spec")}


def differences(saved: Mapping, wanted: Mapping, accepted=()) -> list[str]:
    """``key: file X, asked Y`` for each setting in ``wanted`` (a ``None`` means "whatever the file says")."""
    found = stored_settings(saved)
    return [
        f"{key}: the model file has {found.get(key)!r}, this run asks for {value!r}"
        for key, value in wanted.items()
        if value is not None
        and key not in NOT_COMPARED
        and key not in accepted
        and comparable(key, found.get(key)) != comparable(key, value)
    ]


def check_format(saved, source: str = "the model file") -> dict:
    saved = decode(saved)
    if not isinstance(saved, Mapping) or saved.get("format") != MODEL_FORMAT:
        raise ModelMismatchError(f"{source} holds no AE-FLOW model description.")
    if int(saved.get("version", 0)) > FORMAT_VERSION:
        raise ModelMismatchError(
            f"{source} was written by a newer bundle (model format {saved['version']}, this bundle reads up to "
            f"{FORMAT_VERSION}); update the bundle."
        )
    return dict(saved)


def check_description(state, method: str, settings: Mapping, input_spec: Mapping, defaults: Mapping) -> None:
    """A network's check of the description it is loaded with (its ``set_extra_state``): the same method, and every
    setting the same; a setting missing from the file (added to the bundle after the file was written) has its
    default there."""
    saved = check_format(state)
    if saved.get("method", DEFAULT_METHOD) != method:
        raise ModelMismatchError(
            f"the model file holds a {saved.get('method', DEFAULT_METHOD)} model, this network is {method}"
        )
    saved["network"] = {**defaults, **saved.get("network", {})}
    mismatch = differences(saved, {**settings, "input_spec": input_spec})
    if mismatch:
        raise ModelMismatchError("the model file was made for another network: " + "; ".join(mismatch))


def old_file_message(path) -> str:
    return (
        f"{path} was saved before model files described themselves (bundle < 0.5.0): it has weights but no record "
        "of the network settings and preprocessing they belong to. Convert it once, naming the configs (and any "
        f"overrides) it was trained with: python -m scripts.model_file upgrade {path} --output NEW.pt "
        "--config_file configs/train.json [...] [--set image_size=256 ...]; or retrain."
    )


def read_description(path: str | os.PathLike) -> dict:
    """The description stored in a model file, without building anything."""
    from .checkpoints import load_checkpoint

    state = load_checkpoint(path)
    state = state.get("model", state) if EXTRA_STATE_KEY not in state else state
    if EXTRA_STATE_KEY not in state:
        raise ModelMismatchError(old_file_message(path))
    return check_format(state[EXTRA_STATE_KEY], str(path))


def network_of_description(description: Mapping):
    """The untrained network a model description names (its method, settings and ``input_spec``), its encoder
    awaiting the weights of the file the description came from."""
    from .baselines import method_class
    from .encoders import MODEL_FILE_WEIGHTS

    settings = dict(description["network"])
    if "encoder_weights" in settings:
        settings["encoder_weights"] = MODEL_FILE_WEIGHTS
    return method_class(description.get("method", DEFAULT_METHOD))(**settings, input_spec=description["input_spec"])


def network_from_file(
    path: str | os.PathLike,
    expect: Mapping | None = None,
    map_location=None,
    encoder_runtime: str = "torch",
    skip_unweighted_terms: bool = False,
):
    """The network a model file describes (AE-FLOW or a comparison method of ``scripts.baselines``), with its
    weights and calibration loaded (verified).

    ``expect`` holds settings the caller insists on; each one that is not ``None`` must equal the file's.
    ``encoder_runtime`` runs its frozen encoder on PyTorch or ONNX Runtime (``FrozenEncoder.use_runtime``);
    ``skip_unweighted_terms`` lets every AE-FLOW network inside it (an ensemble's members too) leave out a score
    term of weight zero (``AEFlow.score``): the same scores, less work, for inference.
    """
    from .checkpoints import load_network
    from .encoders import use_encoder_runtime

    description = read_description(path)
    wanted = {key: value for key, value in dict(expect or {}).items() if value is not None}
    owners = _settings_owners(description, wanted)
    members = description["network"].get("members", [])
    mismatch = []
    for member, settings in owners:
        asked = {key: wanted[key] for key in settings if key not in CALIBRATED_SETTINGS}
        part = description if member is None else members[member]
        mismatch += [f"{_part_label(member)}{line}" for line in differences(part, asked)]
    _refuse(path, mismatch)
    network = network_of_description(description)
    use_encoder_runtime(network, encoder_runtime)
    for module in network.modules():
        if hasattr(module, "skip_unweighted_terms"):
            module.skip_unweighted_terms = flag(skip_unweighted_terms, "skip_unweighted_terms")
    network = load_network(network, path, map_location=map_location)
    _refuse(path, calibrated_mismatch(network, owners, wanted))
    return network


def _refuse(path, mismatch: list[str]) -> None:
    if mismatch:
        raise ModelMismatchError(
            f"{path} does not fit this run: " + "; ".join(mismatch) + ". Leave these settings out to use the "
            "model's own (evaluation and inference take them from the model file), or retrain."
        )


def _part_label(member: int | None) -> str:
    """How a mismatch names the part of the file it is in: nothing for the file's own, ``member i: ``."""
    return "" if member is None else f"member {member}: "


def _settings_owners(description: Mapping, wanted: Mapping) -> list[tuple[int | None, list[str]]]:
    """Which part of the file each asked setting is compared with: the file's own method when it has the setting;
    otherwise every member of an ensemble that has it (an ``--encoder`` asked of a Lite0 + Lite2 ensemble names
    one member's encoder, not the file's). A setting no part has (an AE-FLOW key asked of a PatchCore file) is not
    compared."""
    from .baselines import method_class

    own = {*inspect.signature(method_class(description.get("method", DEFAULT_METHOD))).parameters}
    own |= {*stored_settings(description)}
    members = description["network"].get("members", [])
    owners = [(None, [key for key in wanted if key in own])]  # None: the file's own method; else a member's index
    for index, member in enumerate(members):
        owners.append((index, [key for key in wanted if key not in own and key in stored_settings(member)]))
    return owners


def calibrated_mismatch(network, owners: list[tuple[int | None, list[str]]], wanted: Mapping) -> list[str]:
    """``beta`` and ``score_reduction`` asked of a model, compared with what it scores with: validation chooses
    both when the file says ``beta_selection``/``score_reduction`` ``validation``, so the stored setting (what was
    configured) is not what the model applies. ``score_reduction: validation`` asks for a model that chose.
    ``owners``: ``_settings_owners``, which part of the file each asked setting belongs to."""
    from .scores import AnomalyScorer

    mismatch = []
    for member, settings in owners:
        part = _part_label(member)
        scorer = getattr(network if member is None else network.members[member], "scorer", None)
        if not isinstance(scorer, AnomalyScorer):
            continue
        if "beta" in settings and abs(float(wanted["beta"]) - scorer.beta) > 1e-6:
            mismatch.append(f"{part}beta: the model scores with {scorer.beta:g}, this run asks for {wanted['beta']!r}")
        asked = wanted.get("score_reduction")
        chose = asked == "validation" and scorer.reduction_selection == "validation"
        if "score_reduction" in settings and asked != scorer.reduction and not chose:
            mismatch.append(
                f"{part}score_reduction: the model scores with {scorer.reduction!r}"
                f"{' (chosen on validation)' if scorer.reduction_selection == 'validation' else ''}, "
                f"this run asks for {asked!r}"
            )
    return mismatch


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def upgrade(old_path: str, output: str, config_files: list[str], overrides: dict) -> dict:
    """Write ``output``: the weights of a pre-0.5 model file with the description of the configs it was trained
    with. Every weight must fit the network those configs build, so a wrong config is refused, not guessed."""
    from .checkpoints import check_state_dict, load_checkpoint
    from .encoders import MODEL_FILE_WEIGHTS
    from .options import config_parser
    from .reports import atomic_path

    parser = config_parser(config_files, {**overrides, "encoder_weights": MODEL_FILE_WEIGHTS})
    network = parser.get_parsed_content("network_def")
    state = load_checkpoint(old_path)
    state = dict(state.get("model", state))
    if EXTRA_STATE_KEY in state:
        raise ModelMismatchError(f"{old_path} already describes itself: {json.dumps(decode(state[EXTRA_STATE_KEY]))}")
    state[EXTRA_STATE_KEY] = network.get_extra_state()
    check_state_dict(network, state, old_path)
    network.load_state_dict(state, strict=True)
    with atomic_path(output) as tmp:
        torch.save(network.state_dict(), tmp)
    return decode(network.get_extra_state())


def calibration(path: str | os.PathLike) -> dict:
    """What validation chose for a model file, which its settings do not show (they hold what was configured):
    every scorer's beta, image-level reduction and thresholds (an ensemble's own and each member's)."""
    from .scores import AnomalyScorer

    network = network_from_file(path)
    return {
        name: {
            "beta": scorer.beta,
            "reduction": scorer.reduction,
            "threshold": float(scorer.threshold),
            "pixel_threshold": float(scorer.pixel_threshold),
        }
        for name, scorer in network.named_modules()
        if isinstance(scorer, AnomalyScorer)
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.model_file", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser(
        "describe", help="print the description stored in a model file and what validation chose (calibration)"
    )
    show.add_argument("model")
    convert = commands.add_parser("upgrade", help="add the description to a model file of bundle < 0.5.0")
    convert.add_argument("model")
    convert.add_argument("--output", required=True)
    convert.add_argument("--config_file", nargs="+", required=True, help="the configs it was trained with, in order")
    convert.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="the overrides it was trained with")
    args = parser.parse_args(argv)
    try:
        if args.command == "describe":
            described = {**read_description(args.model), "calibration": calibration(args.model)}
        else:
            described = upgrade(args.model, args.output, args.config_file, _parse_overrides(args.set))
    except (ModelMismatchError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(described, indent=4))
    return 0


if __name__ == "__main__":
    sys.exit(main())
