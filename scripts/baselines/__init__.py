"""The paper's comparison methods (table 1) and PatchCore, as networks the bundle's engines, evaluation, model files
and deployment paths serve as they serve AE-FLOW (``scripts.baselines.base.ComparisonMethod``).

Each is a config merged on ``train.json``: ``configs/baseline_<name>.json``. The autoencoder and flow-only rows are
AE-FLOW's own parts (``baseline_autoencoder.json``, ``baseline_flow_only.json``); the others are here:

* ``patchcore`` (Roth et al. 2022): memory bank of locally aggregated patch features, greedy coreset, nearest
  neighbour distance with the paper's reweighting;
* ``differnet`` (Rudolph et al. 2021): a FrEIA flow on multi-scale pooled features;
* ``ganomaly`` (Akcay et al. 2018): encoder-decoder-encoder generator, adversarial + contextual + latent losses;
* ``f-anogan`` (Schlegl et al. 2019): WGAN-GP (MONAI's ``GanTrainer``), then the izi_f encoder.
"""

from __future__ import annotations

import importlib

METHODS = {
    "ae-flow": "scripts.networks:AEFlow",
    "patchcore": "scripts.baselines.patchcore:PatchCore",
    "differnet": "scripts.baselines.differnet:DifferNet",
    "ganomaly": "scripts.baselines.ganomaly:GANomaly",
    "f-anogan": "scripts.baselines.fanogan:FAnoGAN",
    "ensemble": "scripts.ensemble:Ensemble",
}


def method_class(name: str) -> type:
    """The network class of a method named in a model file or config."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(METHODS)}.")
    module, _, attribute = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
