"""The model-zoo's unit-test pattern (ci/unit_tests, spleen): train 1 epoch -> evaluate -> infer with
``ConfigWorkflow``, ``initialize``, ``check_properties`` and ``run``, from whatever directory it is started in.

    python tests/zoo_unit_test_pattern.py BUNDLE_ROOT OUTPUT_DIR
"""

import json
import sys
from pathlib import Path

from monai.bundle import ConfigWorkflow

root, out = Path(sys.argv[1]), Path(sys.argv[2])
assert "scripts" not in sys.modules and not (Path.cwd() / "scripts").exists()
common = dict(
    meta_file=str(root / "configs/metadata.json"),
    logging_file=str(root / "configs/logging.conf"),
    bundle_root=str(root),
)
tiny = {
    "image_size": 64,
    "flow_blocks": 2,
    "epochs": 1,
    "batch_size": 8,
    "default_dataset_dir": str(out / "data"),
    "ckpt_dir": str(out / "models"),
    "output_dir": str(out / "eval"),
}


def check(workflow):
    workflow.initialize()
    missing = workflow.check_properties()
    assert not missing, missing
    workflow.run()
    workflow.finalize()


check(ConfigWorkflow(config_file=str(root / "configs/train.json"), workflow_type="train", **common, **tiny))
check(
    ConfigWorkflow(
        config_file=[str(root / "configs/train.json"), str(root / "configs/evaluate.json")],
        workflow_type="train",
        **common,
        **{k: v for k, v in tiny.items() if k not in ("image_size", "flow_blocks")}
    )
)
check(
    ConfigWorkflow(
        config_file=str(root / "configs/inference.json"),
        workflow_type="infer",
        **common,
        ckpt_dir=str(out / "models"),
        dataset_dir=str(out / "data/volumes"),
        input_glob="test_00[04]_flair.nii.gz",
        output_dir=str(out / "infer")
    )
)
print(
    json.dumps(
        {
            "val_auc": json.load(open(out / "eval/val_metrics.json"))["paper_protocol"]["auc"],
            "test_auc": json.load(open(out / "eval/test_metrics.json"))["paper_protocol"]["auc"],
            "inferred": sorted(p.name for p in (out / "infer").glob("*_scores.json")),
        }
    )
)
