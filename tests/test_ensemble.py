"""An ensemble of trained models as one self-describing model (``scripts.ensemble``): assembled by the training
workflow with ``configs/ensemble.json``, it scores the mean of its members' calibrated scores in evaluation, and
the bundle's inference (what MONAI Deploy and MONAI Label run, on PyTorch or ONNX Runtime) scores what evaluation
scored; members that cannot share one input are refused, naming the setting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import bundle_workflow, tiny_run_override
from monai.utils import convert_to_tensor
from scripts.ensemble import Ensemble, ensemble_of
from scripts.model_file import ModelMismatchError, decode, network_from_file, read_description
from scripts.networks import AEFlow

SEEDS = (1, 2)


def _run(root, configs, **override):
    workflow = bundle_workflow(root, configs, "train", **override)
    workflow.run()
    workflow.finalize()
    return workflow


@pytest.fixture(scope="module")
def assembled(bundle_root, tiny_dataset, tmp_path_factory):
    """Two tiny AE-FLOW runs of different seeds, their ensemble assembled and calibrated on validation, then
    evaluated on test; returns the folders and the evaluation workflow."""
    work = tmp_path_factory.mktemp("ensemble")
    members = []
    for seed in SEEDS:
        _run(
            bundle_root,
            ["train.json"],
            **tiny_run_override(bundle_root, tiny_dataset, work / f"seed_{seed}"),
            seed=seed,
        )
        members.append(work / f"seed_{seed}" / "models" / "model.pt")
    override = tiny_run_override(bundle_root, tiny_dataset, work / "ensemble")
    for key in ("image_size", "flow_blocks"):  # the members' own: the ensemble takes them from their files
        override.pop(key)
    _run(bundle_root, ["train.json", "ensemble.json"], **override, ensemble_members=[str(m) for m in members])
    evaluation = _run(bundle_root, ["train.json", "evaluate.json"], **override)
    return work, members, evaluation


def _scores(path: Path) -> dict[str, float]:
    with open(path) as f:
        return {Path(row["name"]).name: float(row["score"]) for row in csv.DictReader(f)}


def test_assembled_ensemble_describes_its_members_and_is_calibrated(assembled):
    work, members, _ = assembled
    model_file = work / "ensemble" / "models" / "model.pt"
    description = read_description(model_file)
    assert description["method"] == "ensemble"
    assert description["network"]["members"] == [{"method": "ae-flow", **read_description(m)} for m in members]
    network = network_from_file(model_file)
    assert type(network) is Ensemble and len(network.members) == 2
    assert torch.isfinite(network.scorer.threshold) and torch.isfinite(network.scorer.pixel_threshold)
    for member, path in zip(network.members, members):  # each member keeps its own weights and calibration
        torch.testing.assert_close(member.state_dict(), network_from_file(path).state_dict(), rtol=0, atol=0)
    assert (work / "ensemble" / "eval" / "val_kept_metrics.json").is_file()


def test_evaluation_scores_the_mean_of_the_members_calibrated_scores(assembled):
    work, members, evaluation = assembled
    evaluated = _scores(work / "ensemble" / "eval" / "test_scores.csv")
    batches = list(evaluation.parser.get_parsed_content("validate#dataloader"))
    images = torch.cat([convert_to_tensor(batch["image"], track_meta=False) for batch in batches])
    names = [
        f"{Path(n).name}#slice={int(s)}"
        for batch in batches
        for n, s in zip(batch["image"].meta["filename_or_obj"], batch["slice"])
    ]
    with torch.no_grad():
        member_scores = [network_from_file(path).eval().score(images)["score"] for path in members]
    assert not torch.allclose(member_scores[0], member_scores[1])  # two different detectors
    expected = (member_scores[0] + member_scores[1]) / 2
    torch.testing.assert_close(torch.tensor([evaluated[n] for n in names]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_inference_scores_what_evaluation_scored(assembled, bundle_root, tiny_dataset, runtime):
    work, _, _ = assembled
    out = work / f"inference_{runtime}"
    override = {"bundle_root": str(bundle_root), "ckpt_dir": str(work / "ensemble" / "models"), "output_dir": str(out)}
    override.update(dataset_dir=str(tiny_dataset / "volumes"), input_glob="test_*_flair.nii.gz")
    workflow = bundle_workflow(bundle_root, ["inference.json"], "infer", encoder_runtime=runtime, **override)
    workflow.run()
    workflow.finalize()
    inferred = _scores(out / "scores.csv")
    evaluated = _scores(work / "ensemble" / "eval" / "test_scores.csv")
    assert evaluated and set(evaluated) <= set(inferred)
    # the default runtime is evaluation's: the same computation, up to float32 rounding of other batch sizes (inference
    # scores a volume's slices in one batch, evaluation in batches of 8); PyTorch's encoder differs by about 1e-5
    tolerance = 1e-5 if runtime == "auto" else 1e-4
    for name, value in evaluated.items():
        assert inferred[name] == pytest.approx(value, abs=tolerance, rel=1e-6), name


def test_a_run_that_contradicts_a_member_or_the_calibration_is_refused_naming_the_part(assembled):
    """Settings an ensemble's own class does not have (the encoder, the subnet) are its members': asked of the file,
    each member is compared; beta and the reduction are compared with what validation chose, not what was
    configured."""
    work, members, _ = assembled
    model_file = work / "ensemble" / "models" / "model.pt"
    member = network_from_file(members[0])
    with pytest.raises(ModelMismatchError, match=r"member 0: subnet: the model file has 'resnet'.*member 1: subnet"):
        network_from_file(model_file, expect={"subnet": "cnn2"})
    with pytest.raises(ModelMismatchError, match="member 1: encoder: the model file has 'efficientnet-lite0'"):
        network_from_file(model_file, expect={"encoder": "efficientnet-lite1", "feature_norm": None})
    network_from_file(model_file, expect={"encoder": "efficientnet-lite0", "subnet": "resnet", "beta": 1.0})
    chosen, configured = member.scorer.beta, read_description(members[0])["network"]["beta"]
    network_from_file(members[0], expect={"beta": chosen, "score_reduction": member.scorer.reduction})
    wrong = 0.5 if chosen != 0.5 else 0.25
    with pytest.raises(ModelMismatchError, match=f"beta: the model scores with {chosen:g}, this run asks for {wrong}"):
        network_from_file(members[0], expect={"beta": wrong})
    if configured != chosen:  # validation moved beta: the configured value is not what the model applies
        with pytest.raises(ModelMismatchError, match="beta: the model scores with"):
            network_from_file(members[0], expect={"beta": configured})
    with pytest.raises(ModelMismatchError, match="member 0: score_reduction: the model scores with"):
        network_from_file(model_file, expect={"score_reduction": "max" if member.scorer.reduction != "max" else "mean"})


def _description(**settings) -> dict:
    return decode(AEFlow(encoder_weights="none", flow_blocks=2, **settings).get_extra_state())


def test_members_that_cannot_share_one_input_are_refused_naming_the_setting():
    with pytest.raises(ModelMismatchError, match=r"image_size: member 0 has \[64, 64\], member 1 has \[128, 128\]"):
        Ensemble([_description(image_size=64), _description(image_size=128)])
    with pytest.raises(ModelMismatchError, match="input_spec"):
        Ensemble([_description(image_size=64), _description(image_size=64, input_spec={"kind": "image"})])
    with pytest.raises(ValueError, match="at least two member models, got 1"):
        Ensemble([_description(image_size=64)])
    with pytest.raises(ModelMismatchError, match="no AE-FLOW model description"):
        Ensemble([_description(image_size=64), {"weights": 1}])
    with pytest.raises(TypeError, match="a list of model files, got one path"):
        ensemble_of("models/model.pt")


def test_an_ensemble_file_whose_rule_was_edited_is_refused():
    members = [_description(image_size=64)] * 2
    with pytest.raises(ModelMismatchError, match="beta 0.5"):
        Ensemble(members, beta=0.5)
    with pytest.raises(ModelMismatchError, match=r"image_size 128 \(members: \[64, 64\]\)"):
        Ensemble(members, image_size=128)
    Ensemble(members, image_size=64, in_channels=1, beta=1.0, score_normalization="none")  # as a file stores them


def test_an_ensemble_cannot_be_fed_cached_features():
    network = Ensemble([_description(image_size=64)] * 2)
    with pytest.raises(TypeError, match="cache_features: false"):
        network.score(torch.rand(1, 1, 64, 64), features=torch.rand(1, 112, 4, 4))


def test_one_command_trains_the_members_assembles_and_evaluates_them_and_reuses_finished_steps(
    bundle_root, tiny_dataset, tmp_path
):
    from conftest import TINY_OVERRIDES
    from scripts import ensemble

    settings = [
        f"{key}={json.dumps(value)}" for key, value in {**TINY_OVERRIDES, "dataset_dir": str(tiny_dataset)}.items()
    ]
    argv = ["--configs", str(bundle_root / "configs" / "train.json"), "--output", str(tmp_path)]
    argv += ["--encoders", "efficientnet-lite0", "efficientnet-lite1"]
    for setting in settings:
        argv += ["--set", setting]
    assert ensemble.main(argv) == 0
    table = json.loads((tmp_path / "ensemble.json").read_text())
    assert list(table) == ["efficientnet-lite0", "efficientnet-lite1", "ensemble"]
    model_file = tmp_path / "ensemble" / "models" / "model.pt"
    members = read_description(model_file)["network"]["members"]
    assert [member["network"]["encoder"] for member in members] == ["efficientnet-lite0", "efficientnet-lite1"]
    recorded = json.loads((tmp_path / "ensemble" / "settings.json").read_text())
    assert recorded["ensemble_members"] == [str(tmp_path / e / "models" / "model.pt") for e in table if e != "ensemble"]
    assert "encoder" not in recorded  # the members' files hold their settings; the configs' would mislead
    evaluated = json.loads((tmp_path / "ensemble" / "eval" / "test_metrics.json").read_text())
    assert table["ensemble"]["test_auc"] == evaluated["paper_protocol"]["auc"]
    stamp = model_file.stat().st_mtime_ns
    assert ensemble.main(argv) == 0  # every step finished: reused, nothing retrained
    assert model_file.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="at least two different encoders"):
        ensemble.train_ensemble([], {}, tmp_path, ["efficientnet-lite0", "efficientnet-lite0"])


def test_traced_export_of_an_ensemble_gives_its_anomaly_map(assembled, bundle_root):
    """``ckpt_export`` as the README runs it, on an ensemble file: the traced forward is the eager ensemble's map."""
    from monai.bundle import ckpt_export

    work, _, _ = assembled
    model_file = work / "ensemble" / "models" / "model.pt"
    ckpt_export(
        net_id="network_def",
        filepath=str(work / "ensemble.ts"),
        ckpt_file=str(model_file),
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        config_file=str(bundle_root / "configs" / "inference.json"),
        bundle_root=str(bundle_root),
        model_file=str(model_file),
        use_trace=True,
        input_shape=[1, 1, 64, 64],
    )
    traced, network = torch.jit.load(str(work / "ensemble.ts")), network_from_file(model_file).eval()
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(image), network(image), rtol=1e-5, atol=1e-5)


def test_assembly_and_evaluation_are_tracked_in_mlflow(assembled, bundle_root, tiny_dataset, tmp_path):
    """``--tracking mlflow`` on the assembly and on its evaluation: each run records the members and the metrics."""
    from mlflow.tracking import MlflowClient

    _, members, _ = assembled
    override = tiny_run_override(bundle_root, tiny_dataset, tmp_path, output_dir=f"$'{tmp_path / 'eval'}'")
    for key in ("image_size", "flow_blocks"):
        override.pop(key)
    extra = {"tracking": "mlflow", "ensemble_members": [str(m) for m in members]}
    _run(bundle_root, ["train.json", "ensemble.json"], **override, **extra)
    _run(bundle_root, ["train.json", "evaluate.json"], **override, tracking="mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/eval/mlruns.db")
    runs = client.search_runs([client.get_experiment_by_name("monai_experiment").experiment_id])
    assembly, evaluation = sorted(runs, key=lambda run: run.info.start_time)
    assert assembly.data.params["method"] == "ensemble"
    assert assembly.data.params["members"] == str([str(m) for m in members]) and "val_auc" in assembly.data.metrics
    assert "efficientnet-lite0" in evaluation.data.params["members"]  # the file's own description of its members
    assert "test_auc" in evaluation.data.metrics


def test_a_diverged_member_stops_the_assembly_and_a_retrained_member_is_assembled_again(
    bundle_root, tmp_path, monkeypatch, capsys
):
    """``scripts.ensemble`` assembles nothing from a member whose training diverged (it names the member and where
    it diverged); the assembly of members one of which was trained since is not reused; repeated encoders are
    refused. The trainings are faked: what ``run_setting`` leaves, a model file per training included."""
    import time

    from scripts import ablations, ensemble, reports

    assembled = []

    def run_setting(configs, overrides, workdir):
        resolved = ablations.resolved_settings(configs, overrides)
        settings = {"configs": list(configs), "overrides": overrides, **resolved, "wall_time_s": 1.0}
        if overrides.get("learning_rate") == 1.0 and overrides.get("encoder") == "efficientnet-lite2":
            diverged = {"diverged": {"what": "loss", "epoch": 3, "iteration": 40, "message": "Non-finite loss"}}
            reports.write_json(workdir / "settings.json", {**settings, **diverged})
            return {**diverged, "wall_time_s": 1.0, "overrides": overrides}
        if "ensemble_members" in overrides:
            assembled.append(overrides["ensemble_members"])
        (workdir / "models").mkdir(parents=True, exist_ok=True)
        (workdir / "models" / "model.pt").write_bytes(f"{overrides} {len(assembled)} {time.time_ns()}".encode())
        for name in ("test_metrics.json", "val_kept_metrics.json"):
            reports.write_json(workdir / "eval" / name, {"epoch": 1, "paper_protocol": {"auc": 0.9}})
        reports.write_json(workdir / "settings.json", settings)
        return {"paper_protocol": {"auc": 0.9}}

    monkeypatch.setattr(ablations, "run_setting", run_setting)
    configs = [str(bundle_root / "configs" / "train.json")]
    ensemble.train_ensemble(configs, {"learning_rate": 0.001}, tmp_path)
    ensemble.train_ensemble(configs, {"learning_rate": 0.001}, tmp_path)
    assert len(assembled) == 1  # every step reused
    (tmp_path / "efficientnet-lite2" / "settings.json").unlink()  # that member is trained again: a new model file
    ensemble.train_ensemble(configs, {"learning_rate": 0.001}, tmp_path)
    assert len(assembled) == 2
    argv = ["--configs", *configs, "--output", str(tmp_path), "--set", "learning_rate=1.0"]
    assert ensemble.main(argv) == 1 and len(assembled) == 2
    message = capsys.readouterr().err
    assert "member efficientnet-lite2 diverged at epoch 3, iteration 40 (loss)" in message
    assert "no ensemble is assembled" in message
    with pytest.raises(ValueError, match="efficientnet-lite0 more than once"):
        ensemble.train_ensemble(
            configs, {}, tmp_path, ["efficientnet-lite0", "efficientnet-lite2", "efficientnet-lite0"]
        )
