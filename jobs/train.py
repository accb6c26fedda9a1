"""Ray job entry point for training: the same flags as `insect train`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py s3://bucket/labelled --output s3://bucket/models/m1
"""

import os
import sys

# Run the code uploaded with --working-dir, not whatever insect the cluster has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from insectlib.cli.main import entry  # noqa: E402

if __name__ == "__main__":
    entry(["train", *sys.argv[1:]], job=True)
