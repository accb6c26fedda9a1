"""Whether the connected cluster can hold a run at all, decided before the run starts: Ray
would otherwise wait for ever for actors or workers it cannot place (and Ray Train retries,
then dumps its state). With --wait-for-nodes, an autoscaling cluster is asked for the
nodes (`ray.autoscaler.sdk.request_resources`) and given that long to add them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import ray

from insectlib.errors import InsectError
from insectlib.runtime import console

POLL_S = 5.0


def _nodes() -> list[dict[str, float]]:
    return [n["Resources"] for n in ray.nodes() if n["Alive"]]


def bundles_that_fit(per_unit: dict[str, float], placement: str = "PACK") -> int:
    """How many bundles of `per_unit` resources the alive nodes hold, placed as Ray places
    them (STRICT_SPREAD: one a node; STRICT_PACK: all on one node)."""
    per_node = [
        min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in per_unit.items())
        for node in _nodes()
    ]
    if placement == "STRICT_SPREAD":
        return sum(1 for n in per_node if n > 0)
    if placement == "STRICT_PACK":
        return max(per_node, default=0)
    return sum(per_node)


def describe_cluster() -> str:
    nodes = _nodes()
    cpus = sum(n.get("CPU", 0) for n in nodes)
    gpus = sum(n.get("GPU", 0) for n in nodes)
    counted = console.counted
    return f"{counted(cpus, 'CPU')} and {counted(gpus, 'GPU')} on {counted(len(nodes), 'node')}"


@dataclass
class NodesWait:
    """--wait-for-nodes for one run: the seconds its checks may wait for an autoscaler's
    nodes, all of them together, and how long they have waited."""

    seconds: float = 0.0
    waited: float = 0.0


def check_resources(
    per_unit: dict[str, float],
    units: int,
    what: str,
    advice: str,
    wait: NodesWait | float = 0.0,
    placement: str = "PACK",
) -> None:
    """Refuse (one line naming what the cluster has) a run of `units` bundles of `per_unit`
    that the cluster cannot place; `what` names them ("2 model actors"), `advice` says what
    to do ("ask for less with --workers"). With a `wait` of seconds (a run's checks share
    one `NodesWait`), ask an autoscaler and wait first, what is left of it."""
    wait = wait if isinstance(wait, NodesWait) else NodesWait(wait)
    left = max(0.0, wait.seconds - wait.waited)
    began = time.monotonic()
    asked = False
    try:
        while bundles_that_fit(per_unit, placement) < units:
            spent = time.monotonic() - began
            if spent >= left:
                raise InsectError(_refusal(per_unit, units, what, advice, wait.seconds, asked))
            if not asked:
                from ray.autoscaler.sdk import request_resources

                request_resources(bundles=[dict(per_unit)] * units)
                console.say(
                    f"waiting up to {math.ceil(left)} s for the cluster to add nodes for "
                    f"{what} ({describe_cluster()} now)"
                )
                asked = True
            time.sleep(min(POLL_S, left - spent))
    finally:
        if asked:  # a check that passed at once takes nothing from the run's wait
            wait.waited += time.monotonic() - began


def _refusal(per_unit: dict, units: int, what: str, advice: str, waited: float, asked: bool) -> str:
    if per_unit.get("GPU") and not any(n.get("GPU") for n in _nodes()):
        return (
            f"--gpu: the cluster has no GPU ({describe_cluster()}): drop --gpu, or connect "
            "to a cluster with GPU nodes"
            + ("" if waited else " (an autoscaling one: with --wait-for-nodes SECONDS)")
        )
    bundle = ", ".join(console.counted(amount, name) for name, amount in per_unit.items())
    bundle += " each" if units > 1 else ""
    after = f" after waiting {waited:g} s" if waited else ""
    after += "" if asked or not waited else " (all of it before this check)"
    fit = "does not" if units == 1 else "do not"
    return (
        f"{what} ({bundle}) {fit} fit the cluster{after}: it has {describe_cluster()}; {advice}"
        + ("" if waited else ", or give an autoscaling cluster --wait-for-nodes SECONDS")
    )
