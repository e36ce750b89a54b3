"""Run the MONAI Deploy app (``deploy/app/app.py``) as a MAP would, where only ``deploy/app/requirements.txt`` and
its dependencies are installed: every other installed package is blocked from import.

Usage: python tests/deploy_app_with_only_its_requirements.py APP_ARGS...  (the app's -i, -o, -m)
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as metadata
import re
import runpy
import sys
from pathlib import Path

from packaging.requirements import Requirement

APP = Path(__file__).resolve().parents[1] / "deploy" / "app" / "app.py"
TOOLS = {"pip", "setuptools", "wheel"}  # every Python environment's packaging tools


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installable() -> set[str]:
    """The distributions the requirements file installs: those listed and their dependencies, with the extras each
    requirement names (``tritonclient[all]``), as pip resolves them."""
    lines = [line.strip() for line in APP.with_name("requirements.txt").read_text().splitlines()]
    todo = [Requirement(line) for line in lines if line and not line.startswith("#")]
    found, seen = set(TOOLS), set()
    while todo:
        requirement = todo.pop()
        name = _name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        found.add(name)
        try:
            needs = [Requirement(r) for r in metadata.requires(name) or []]
        except metadata.PackageNotFoundError:
            continue
        for need in needs:
            extras = requirement.extras or {""}
            if need.marker is None or any(need.marker.evaluate({"extra": extra}) for extra in extras):
                todo.append(need)
    return found


def blocked_modules() -> set[str]:
    allowed = installable()
    return {
        module
        for module, distributions in metadata.packages_distributions().items()
        if not any(_name(d) in allowed for d in distributions)
    }


class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, modules: set[str]):
        self.modules = modules

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.modules:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed by deploy/app/requirements.txt)")
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, Blocker(blocked_modules()))
    sys.argv = ["app", *sys.argv[1:]]
    runpy.run_path(str(APP), run_name="aeflow_app")["AEFlowAnomalyApp"]().run()
