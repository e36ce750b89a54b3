"""Helpers for ``configs/multi_gpu_train.json`` and ``configs/multi_gpu_evaluate.json`` (torchrun + DDP)."""

from __future__ import annotations

from typing import Sequence


def unwrapped(network):
    """The network itself, not its DistributedDataParallel wrapper (the network's own methods live there)."""
    return network.module if hasattr(network, "module") else network


def check_world_size(items: Sequence, world_size: int) -> int:
    """Stop before training when there are fewer training items than processes.

    ``DistributedSampler`` would pad every rank with repeats of the same few items, so each process would train
    on copies: a silently wrong run rather than a faster one.
    """
    if len(items) < world_size:
        raise ValueError(
            f"{len(items)} training item(s) for {world_size} processes: use at most {len(items)} processes "
            "(torchrun --nproc_per_node / --nnodes), or more data."
        )
    return len(items)


def check_early_stopping(patience: int | None) -> None:
    """Refuse early stopping under DDP: only rank 0 validates, so a stop there would leave the other processes
    waiting for it at their next gradient all-reduce, for ever."""
    if patience:
        raise ValueError(
            f"early_stop_patience {patience} cannot be used with multi_gpu_train.json: only rank 0 validates, and "
            "its stop would leave the other processes waiting. Set early_stop_patience to null (--early_stop_patience "
            "null) and choose the epoch from the saved best-validation model, or train on one device."
        )
