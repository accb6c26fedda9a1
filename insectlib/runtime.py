"""Connecting to Ray."""

from __future__ import annotations

import os

import ray


def init_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address` ("auto", "ray://host:port", "host:port").

    With no address and no $RAY_ADDRESS (which `ray job submit` sets), start a local Ray
    rather than attaching to whatever cluster happens to run on this machine.
    """
    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    ray.init(address=address, logging_level="WARNING")
