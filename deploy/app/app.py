"""MONAI Deploy application for the AE-FLOW bundle: one NIfTI volume or 2D image in, anomaly map, 0/1 anomaly
mask and a JSON of scores out.

Operators: ``AnomalyInputOperator`` (reads the input with the bundle's own strict loader) ->
``AnomalyBundleInferenceOperator`` (MONAI Deploy's ``MonaiBundleInferenceOperator``, which runs the bundle's
``configs/inference.json`` ``preprocessing`` / ``inferer`` / ``postprocessing`` on ``device``, with an extra port
for the float map and scores) -> ``AnomalyReportOperator`` (writes the files). Its ``pred`` port carries the uint8
mask (label 1 = "anomaly"), which is what Deploy's DICOM SEG writer takes; see docs/deploy.md for DICOM input.

    python deploy/app -i input_dir -o output_dir -m bundle_dir     # bundle_dir holds configs/ and models/
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import AppContext, Application, Fragment, Image, Operator, OperatorSpec
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)


def _bundle_path(app_context: AppContext) -> Path:
    bundle = Path(app_context.model_path)
    if bundle.is_file():  # a model.ts inside a bundle's models/ folder
        bundle = bundle.parent.parent
    if not (bundle / "configs").is_dir():  # a MAP's models folder holding the bundle as its one sub-folder
        candidates = [p for p in bundle.iterdir() if (p / "configs").is_dir()] if bundle.is_dir() else []
        if len(candidates) != 1:
            raise FileNotFoundError(f"No bundle (a folder with configs/ and models/) at {app_context.model_path}.")
        bundle = candidates[0]
    if str(bundle) not in sys.path:  # the bundle's scripts/ package serves the loader and report as well
        sys.path.insert(0, str(bundle))
    return bundle


class AnomalyInputOperator(Operator):
    """Reads the one input file in the input folder as the model's ``input_spec`` says (its reader and reader
    arguments: a 2D model reads PNG or JPEG images, a 3D model NIfTI volumes)."""

    def __init__(self, fragment: Fragment, *args, input_path: Path, input_spec: dict, **kwargs):
        self.input_path = Path(input_path)
        self.input_spec = input_spec
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        from scripts.deploy import read_input

        files = [self.input_path] if self.input_path.is_file() else sorted(p for p in self.input_path.iterdir())
        files = [f for f in files if f.is_file() and not f.name.startswith(".")]
        if len(files) != 1:
            raise ValueError(f"Expected exactly one image file in {self.input_path}, found {len(files)}.")
        array, meta = read_input(files[0], self.input_spec)
        op_output.emit(Image(array, metadata=meta), "image")


class AnomalyBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, plus a ``report`` port with the postprocessing's float map, mask and scores
    (the ``pred`` port alone carries the uint8 mask).

    The SDK parses a bundle folder without setting ``bundle_root``, so the config's "." would be the working
    directory (and ``models/model.pt`` someone else's); here the parser gets the bundle's own path first.
    """

    def _init_config(self, config_names):
        from monai.deploy.operators import monai_bundle_inference_operator as sdk

        read = sdk.get_bundle_config

        def read_with_bundle_root(path, names):
            parser = read(path, names)
            parser["bundle_root"] = str(path)
            parser.parse(reset=True)
            return parser

        sdk.get_bundle_config = read_with_bundle_root
        try:
            super()._init_config(config_names)
        finally:
            sdk.get_bundle_config = read

    def setup(self, spec: OperatorSpec):
        super().setup(spec)
        spec.output("report")

    def post_process(self, data, *args, **kwargs):
        self._report = super().post_process(data, *args, **kwargs)
        return self._report

    def compute(self, op_input, op_output, context):
        super().compute(op_input, op_output, context)
        op_output.emit(self._report, "report")


class AnomalyReportOperator(Operator):
    """Writes the anomaly map, mask and scores as the bundle's own inference does (``scripts.deploy.write_report``)."""

    def __init__(
        self, fragment: Fragment, *args, output_folder: Path, input_spec: dict, nifti_for_2d: bool = False, **kwargs
    ):
        self.output_folder = Path(output_folder)
        self.input_spec = input_spec
        self.nifti_for_2d = nifti_for_2d
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("pred")  # the SDK's uint8 mask Image: where a DICOM SEG writer would be connected instead
        spec.input("report")

    def compute(self, op_input, op_output, context):
        from scripts.deploy import write_report

        mask, report = op_input.receive("pred"), op_input.receive("report")
        logging.info(
            "Mask from the bundle operator: shape %s, %d anomalous voxels.", mask.asnumpy().shape, mask.asnumpy().sum()
        )
        written = write_report(self.output_folder, report, self.input_spec, self.nifti_for_2d)
        logging.info("Wrote %s", ", ".join(str(p) for p in written.values()))


class AEFlowAnomalyApp(Application):
    def compose(self):
        app_context = Application.init_app_context(self.argv)
        bundle = _bundle_path(app_context)
        # No model objects from the SDK's factory: it would hand the inferer a generic Model wrapper of the folder,
        # while the bundle's scores need its eager network, which the operator then builds from models/model.pt.
        app_context.models = None
        from scripts.model_file import read_description

        input_spec = read_description(bundle / "models" / "model.pt")["input_spec"]
        input_path = Path(app_context.input_path)
        # one input per run: a source operator without a count condition would emit for ever
        loader = AnomalyInputOperator(
            self, CountCondition(self, 1), input_path=input_path, input_spec=input_spec, name="input"
        )
        inference = AnomalyBundleInferenceOperator(
            self,
            app_context=app_context,
            bundle_path=bundle,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_config_names=BundleConfigNames(config_names=["inference"]),
            name="aeflow_bundle",
        )
        output = Path(app_context.output_path)
        # the packaged inference.json's output option, as the bundle's own inference reads it
        from scripts.options import flag

        settings = json.loads((bundle / "configs" / "inference.json").read_text())
        nifti_for_2d = flag(settings.get("write_nifti_for_2d", False), "write_nifti_for_2d")
        report = AnomalyReportOperator(
            self, output_folder=output, input_spec=input_spec, nifti_for_2d=nifti_for_2d, name="report"
        )
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, report, {("pred", "pred"), ("report", "report")})


def main():
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"))
    AEFlowAnomalyApp().run()


if __name__ == "__main__":
    main()
