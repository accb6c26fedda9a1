"""Connecting to Ray."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import TypeVar

import ray

T = TypeVar("T")


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


def run(fn: Callable[..., T], cfg) -> T:
    """`fn(cfg)` here, or, for a Ray Client address (ray://host:port), as a task on the
    cluster: Ray Data and Ray Train need a real driver process, which a Ray Client
    connection is not, so the driver's part runs on the cluster as a zero-CPU task with this
    package shipped along (paths are then the cluster's, as with `ray job submit`)."""
    address = getattr(cfg, "address", None)
    if not (address and address.startswith("ray://")):
        return fn(cfg)
    import insectlib

    ray.init(
        address=address,
        runtime_env={"py_modules": [os.path.dirname(insectlib.__file__)]},
        logging_level="WARNING",
    )
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(fn)
        return ray.get(task.remote(dataclasses.replace(cfg, address=None)))
    finally:
        ray.shutdown()
