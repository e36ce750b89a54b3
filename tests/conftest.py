"""Shared fixtures: a tiny synthetic data set in the bundle's datalist form, and the bundle's paths."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

BUNDLE_ROOT = Path(__file__).resolve().parents[1]
SHARED = BUNDLE_ROOT.parent / "shared"
sys.path.insert(0, str(BUNDLE_ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

# Settings that keep a whole train -> evaluate -> infer cycle to seconds on two CPU cores.
TINY_OVERRIDES = {"image_size": 64, "epochs": 1, "batch_size": 8, "num_workers": 0, "flow_blocks": 2}


def pytest_sessionfinish(session, exitstatus):
    session.config._aeflow_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process once pytest has reported: the interpreter's teardown of ITK (which MONAI imports) keeps a
    finished run busy for many minutes on a small CPU, and CI would wait for it."""
    status = getattr(config, "_aeflow_exitstatus", None)
    if status is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def run_forked_together(calls: list, timeout: float = 1800) -> list[int]:
    """Run each ``call()`` in its own forked child, all at once; their exit codes (negative: killed by that signal).

    A fork inherits the imported torch and MONAI, which a fresh ``python -m monai.bundle`` imports again (minutes
    on a two-core CPU), and it ends with ``os._exit``, skipping the slow interpreter teardown of ITK. Each child
    keeps to one thread, as DataLoader workers do after a fork: OpenMP pools are not fork-safe.
    """

    def child(call) -> None:
        import torch

        torch.set_num_threads(1)
        call()

    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=child, args=(call,)) for call in calls]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    stuck = [process for process in processes if process.is_alive()]
    for process in stuck:
        process.kill()
        process.join()
    if stuck:
        pytest.fail(f"{len(stuck)} of {len(processes)} forked process(es) did not finish in {timeout} s")
    return [process.exitcode for process in processes]


def run_forked(target, *args, timeout: float = 1800, **kwargs) -> int:
    """Run ``target(*args, **kwargs)`` in a forked child (see ``run_forked_together``); its exit code."""
    return run_forked_together([functools.partial(target, *args, **kwargs)], timeout)[0]


@pytest.fixture(scope="session")
def bundle_root() -> Path:
    return BUNDLE_ROOT


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Five small phantom volumes (3 healthy for training, 1 + 1 for validation and test), every 4th slice."""
    from scripts.synthetic import prepare_default_dataset

    root = tmp_path_factory.mktemp("tiny_synthetic")
    prepare_default_dataset(
        root,
        seed=7,
        splits={"training": (3, 0), "validation": (1, 1), "test": (1, 1)},
        shape=(48, 48, 24),
        slice_step=2,
    )
    return root


def bundle_workflow(root: Path, configs: list[str], workflow_type: str, **override):
    """An initialised ``ConfigWorkflow`` of the bundle's configs, checked as MONAI's tools check them."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(root / "configs" / name) for name in configs],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **override,
    )
    workflow.initialize()
    assert not workflow.check_properties()  # every id MONAI's tools expect is there and wired correctly
    return workflow


def assert_same_state(state: dict, expected: dict, atol: float = 0.0) -> None:
    """Two network state dicts hold the same weights and description (NaN equal to NaN: an unset threshold)."""
    import torch

    assert state.keys() == expected.keys()
    for key, value in expected.items():
        rtol = 0.0 if atol == 0 else 1e-4
        torch.testing.assert_close(state[key], value, atol=atol, rtol=rtol, equal_nan=True, msg=key)


def tiny_run_override(root: Path, dataset: Path, out: Path, output_dir: str | None = None) -> dict:
    """Overrides for a tiny run of the bundle on ``dataset`` with its models and outputs under ``out``."""
    return {
        "bundle_root": str(root),
        "dataset_dir": str(dataset),
        "ckpt_dir": str(out / "models"),
        "output_dir": output_dir or str(out / "eval"),
        **TINY_OVERRIDES,
    }


@pytest.fixture(scope="session")
def trained(bundle_root, tiny_dataset, tmp_path_factory):
    """One epoch of single-process training on the tiny data set; returns the overrides that locate its outputs."""
    override = tiny_run_override(bundle_root, tiny_dataset, tmp_path_factory.mktemp("bundle_run"))
    workflow = bundle_workflow(bundle_root, ["train.json"], "train", **override)
    workflow.run()
    workflow.finalize()
    return override
