"""Load: inference over a growing list of inputs keeps its peak resident memory flat (a cheap version of
``python -m scripts.memory_check``)."""

from __future__ import annotations

from scripts.memory_check import measure

GROWTH_LIMIT_MIB = 40.0  # a per-input leak of 3.5 MiB or more over the 12 extra inputs would exceed it


def test_peak_memory_is_flat_as_the_input_list_grows(bundle_root, tmp_path):
    result = measure(bundle_root, tmp_path, count=4, factor=4)
    print(result)
    assert result["large"]["inputs"] == 16
    assert result["peak_growth_mib"] < GROWTH_LIMIT_MIB, result
