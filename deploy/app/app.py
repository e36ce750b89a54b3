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

import logging
import os
import sys
from pathlib import Path

from monai.deploy.core import AppContext, Application, Fragment, Image, Operator, OperatorSpec
from monai.deploy.core.io_type import IOType
from monai.deploy.operators.monai_bundle_inference_operator import (
    BundleConfigNames,
    IOMapping,
    MonaiBundleInferenceOperator,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


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
    """Reads the one input file in the input folder; 2D images switch the bundle to configs/inference_2d.json."""

    def __init__(self, fragment: Fragment, *args, input_path: Path, **kwargs):
        self.input_path = Path(input_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("image")

    def compute(self, op_input, op_output, context):
        from scripts.deploy import read_input

        files = [self.input_path] if self.input_path.is_file() else sorted(p for p in self.input_path.iterdir())
        files = [f for f in files if f.is_file() and not f.name.startswith(".")]
        if len(files) != 1:
            raise ValueError(f"Expected exactly one image file in {self.input_path}, found {len(files)}.")
        is_2d = files[0].suffix.lower() in IMAGE_SUFFIXES
        array, meta = read_input(files[0], "PILReader" if is_2d else "NibabelReader")
        op_output.emit(Image(array, metadata=meta), "image")


class AnomalyBundleInferenceOperator(MonaiBundleInferenceOperator):
    """The SDK's bundle operator, plus a ``report`` port with the postprocessing's float map, mask and scores
    (the ``pred`` port alone carries the uint8 mask)."""

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
    def __init__(self, fragment: Fragment, *args, output_folder: Path, **kwargs):
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("report")

    def compute(self, op_input, op_output, context):
        from scripts.deploy import write_report

        written = write_report(self.output_folder, op_input.receive("report"))
        logging.info("Wrote %s", ", ".join(str(p) for p in written.values()))


class AEFlowAnomalyApp(Application):
    def compose(self):
        app_context = Application.init_app_context(self.argv)
        bundle = _bundle_path(app_context)
        input_path = Path(app_context.input_path)
        single = [input_path] if input_path.is_file() else [p for p in input_path.iterdir() if p.is_file()]
        is_2d = any(p.suffix.lower() in IMAGE_SUFFIXES for p in single)
        configs = ["inference", "inference_2d"] if is_2d else ["inference"]
        loader = AnomalyInputOperator(self, input_path=input_path, name="input")
        inference = AnomalyBundleInferenceOperator(
            self,
            app_context=app_context,
            bundle_path=bundle,
            input_mapping=[IOMapping("image", Image, IOType.IN_MEMORY)],
            output_mapping=[IOMapping("pred", Image, IOType.IN_MEMORY)],
            bundle_config_names=BundleConfigNames(config_names=configs),
            name="aeflow_bundle",
        )
        report = AnomalyReportOperator(self, output_folder=Path(app_context.output_path), name="report")
        self.add_flow(loader, inference, {("image", "image")})
        self.add_flow(inference, report, {("report", "report")})


def main():
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "INFO"))
    AEFlowAnomalyApp().run()


if __name__ == "__main__":
    main()
