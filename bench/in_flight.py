"""Tasks in flight per model actor: `insect classify` at steady state with 1 and with 2
tasks (of one block of one batch here) in flight an actor (whatever the product's rule,
`dataset.tasks_in_flight`, would give: set in this driver, which builds the pool), in a
pool of one-thread actors (one per core, the rule's shape for fp32 and for int8 on vector
units) and in one actor of every core's threads, ROUNDS rounds, each in the reverse order
of the one before.

    .venv/bin/python bench/in_flight.py [--images 768] [--precision bf16]

VGG-16 at 224 px, random weights, compiled, high-entropy 1024x768 camera JPEGs (bench/shapes.py's);
steady state as bench/shapes.py measures it (a run less one of a quarter of its images).
Writes bench/results/in-flight-<cpu>.json; docs/performance.md renders it.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from common import result_path, write_result
from shapes import camera_jpegs, classify_rate, make_model, pools, tasks_in_flight

from insectlib.model.precision import cpu_name

ROUNDS = 2
IN_FLIGHT = (1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    found: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = camera_jpegs(os.path.join(tmp, "camera"), args.images)
        model = make_model(os.path.join(tmp, "model"))
        for round_ in range(ROUNDS):
            order = 1 if round_ % 2 == 0 else -1
            for name, settings in list(pools().items())[::order]:
                for tasks in IN_FLIGHT[::order]:
                    out = os.path.join(tmp, f"out-{round_}-{name}-{tasks}")
                    with tasks_in_flight(tasks):
                        run = classify_rate(
                            images, model, out, precision=args.precision, compile="on", **settings
                        )
                    runs = found.setdefault(name, {}).setdefault(str(tasks), {})
                    runs.setdefault("steady", []).append(run["steady"])
                    runs.setdefault("whole", []).append(run["whole"])
                    print(name, tasks, run, flush=True)
    write_result(
        args.out or result_path("in-flight"),
        {
            "benchmark": "in_flight",
            "images": args.images,
            "precision": args.precision,
            "rounds": ROUNDS,
            "cpu": cpu_name(),
            "runs": found,
        },
    )


if __name__ == "__main__":
    main()
