"""The one retry policy for storage: every S3 request insect makes (reads, listings, part
footers, the lock) and every read or write of a classification part goes through
`retrying`.

Budget: READ_ATTEMPTS (4) attempts with back-offs of 1, 2 and 4 s, each times a jitter of
0.5-1.5: at most 10.5 s of waiting, plus each attempt's own timeouts (`S3_CLIENT`: 5 s to
connect, 60 s to read). Neither botocore nor s3fs retries underneath (`S3_CLIENT`,
`S3FS_RETRIES`): a request is tried exactly READ_ATTEMPTS times.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from insectlib.errors import ImageError, InsectError, StorageUnavailable

T = TypeVar("T")

READ_ATTEMPTS = 4
READ_BACKOFF_S = 1.0  # the first back-off; doubled after each failed attempt
# botocore's client settings for every S3 client insect makes (s3fs's and its own):
# bounded timeouts, so that an unreachable endpoint fails in seconds, and no retries of
# its own (`retrying` is the policy).
S3_CLIENT = {
    "connect_timeout": 5,
    "read_timeout": 60,
    "retries": {"max_attempts": 1, "mode": "standard"},
}
S3FS_RETRIES = 1  # s3fs's own loop (SlowDown, timeouts): one attempt, no retry


def retrying(fn: Callable[[], T], uri: str, action: str = "read") -> T:
    """`fn()`, retried with exponential back-off on any failure but the file's own state
    (FileNotFoundError, ImageError, bad content: ValueError) or a problem already worded
    for the user (InsectError); after READ_ATTEMPTS it raises StorageUnavailable naming
    `uri` and what `fn` did to it (`action`)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return fn()
        except (FileNotFoundError, ImageError, ValueError, InsectError):
            raise  # asking again cannot help
        except Exception as e:
            if attempt == READ_ATTEMPTS - 1:
                raise StorageUnavailable(
                    f"cannot {action} {uri} after {READ_ATTEMPTS} attempts: {type(e).__name__}: {e}"
                ) from None
            time.sleep(READ_BACKOFF_S * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")
