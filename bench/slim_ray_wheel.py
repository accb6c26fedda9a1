"""The wheels the GPU machine lacks, small enough to travel with one device call.

    python bench/slim_ray_wheel.py [--out .whl] [--python-version 3.12]

The lent GPU machine (Python 3.12, torch, no Ray, no network) gets its packages as wheels
carried in the call, 64 MiB in all with the working tree. Ray's cp312 wheel is 79 MB, of
which ray/jars (Java workers) is 32 MB and ray/rllib 1.7 MB, neither used by insect: this
downloads the pinned Ray release (constraints.txt) with pip, writes it again without them
(RECORD rewritten to match), downloads the few other packages the machine lacks (what
`ray[data,train]` requires beyond the machine's package list, pinned as constraints.txt
pins them) and records names and sizes in OUT/wheels.json. bench/gpu_check.sh installs
them with `pip install --no-index --no-deps --target`.
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DROPPED = ("ray/jars/", "ray/rllib/")  # Java workers, reinforcement learning: not insect's
# What Ray 2.60's core, `data` and `train` need that the GPU machine's image lacks
# (its package list: /work/.library/device/KINDS.md): jsonschema (runtime environments, at
# `import ray`) and pydantic (Ray Train v2, at `import ray.train`), with their own needs.
# Found by running insect under an emulation of that package list. Ray's `default` extra
# (dashboard, metrics) is left out: Ray then runs as a minimal install, without a dashboard.
EXTRA = (
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    # pydantic 2.14 needs typing-extensions 4.16 or newer; the machine's may be older.
    "typing-extensions",
)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
]


def pinned(name: str) -> str:
    """`name==version` as constraints.txt pins it (any version if it does not)."""
    wanted = re.sub(r"[-_.]+", "-", name).lower()
    with open(os.path.join(REPO, "constraints.txt")) as f:
        for line in f:
            if "==" in line and not line.startswith("#"):
                found, version = line.strip().split("==")
                if re.sub(r"[-_.]+", "-", found).lower() == wanted:
                    return f"{name}=={version}"
    return name


def download(requirement: str, folder: str, python: str) -> str:
    """The path of the wheel pip downloads for `requirement` (no dependencies)."""
    before = set(os.listdir(folder))
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
         "--python-version", python, "--implementation", "cp", *platforms,
         "-d", folder, requirement],
        check=True,
    )  # fmt: skip
    new = set(os.listdir(folder)) - before
    name = re.sub(r"[-_.]+", "_", requirement.split("==")[0]).lower()
    found = new or {f for f in before if re.sub(r"[-_.]+", "_", f).lower().startswith(name)}
    return os.path.join(folder, sorted(found)[0])


def slim(wheel: str, out: str) -> None:
    """`wheel` rewritten into `out` without the DROPPED folders; RECORD lists what is left."""
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if info.filename.startswith(DROPPED) or info.filename == record:
                continue
            data = src.read(info)
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            lines.append(f"{info.filename},sha256={digest.decode()},{len(data)}")
        lines.append(f"{record},,")
        dst.writestr(record, "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(REPO, ".whl"))
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for old in glob.glob(os.path.join(args.out, "*.whl")):
        os.remove(old)
    with tempfile.TemporaryDirectory() as tmp:
        ray = download(pinned("ray"), tmp, args.python_version)
        slim(ray, os.path.join(args.out, os.path.basename(ray)))
        for name in EXTRA:
            download(pinned(name), args.out, args.python_version)
    wheels = {
        os.path.basename(p): os.path.getsize(p)
        for p in sorted(glob.glob(os.path.join(args.out, "*.whl")))
    }
    total = sum(wheels.values())
    summary = {"python": args.python_version, "dropped": DROPPED, "wheels": wheels}
    summary["total_bytes"] = total
    with open(os.path.join(args.out, "wheels.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for name, size in wheels.items():
        print(f"{size / 2**20:7.1f} MiB  {name}")
    print(f"{total / 2**20:7.1f} MiB  in all, in {args.out}")


if __name__ == "__main__":
    main()
