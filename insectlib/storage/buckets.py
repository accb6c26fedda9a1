"""Listing buckets through botocore's public client: `ListObjectsV2` pages of up to 1,000
keys, fetched one at a time as the caller consumes them (the first names come before the
listing ends, and only one page of names is held), each request under the one retry
policy (`retry`). s3fs (through fsspec) reads and writes the objects themselves.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

from insectlib.config import S3Options
from insectlib.errors import InsectError
from insectlib.storage import retry

PAGE_KEYS = 1000  # S3's own maximum per ListObjectsV2 request
# Error codes of a request that the caller may not make: reported as access denied.
DENIED = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
     "InvalidToken", "AllAccessDisabled"}
)  # fmt: skip


def endpoint(options: S3Options | None) -> str | None:
    """The endpoint URL requests go to: the option, else $AWS_ENDPOINT_URL, else AWS."""
    found = (options.endpoint_url if options else None) or os.environ.get("AWS_ENDPOINT_URL")
    return found or None


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, anonymous: bool, pid: int):
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(**retry.S3_CLIENT, **({"signature_version": UNSIGNED} if anonymous else {}))
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint_url, config=config
    )


def client(options: S3Options | None):
    """A botocore S3 client for `options` (one per process; credentials from the standard
    AWS chain, as s3fs takes them)."""
    return _client(endpoint(options), bool(options and options.anonymous), os.getpid())


def pages(
    options: S3Options | None, bucket: str, prefix: str, delimiter: str = ""
) -> Iterator[list[tuple[str, bool]]]:
    """The keys under `prefix` (and, with a `delimiter`, the common prefixes one level
    down) as pages of ("bucket/key", is a prefix); prefixes lose their trailing
    delimiter, as fsspec names folders. Each page is one request, made when asked for."""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": PAGE_KEYS}
    if delimiter:
        request["Delimiter"] = delimiter
    uri = f"s3://{bucket}/{prefix}"
    while True:
        page = retry.retrying(lambda: _list(options, request, uri), uri)
        entries = [(f"{bucket}/{o['Key']}", False) for o in page.get("Contents", ())]
        entries += [
            (f"{bucket}/{p['Prefix'][: -len(delimiter)]}", True)
            for p in page.get("CommonPrefixes", ())
        ]
        yield entries
        if not page.get("IsTruncated"):
            return
        request["ContinuationToken"] = page["NextContinuationToken"]


def _list(options: S3Options | None, request: dict, uri: str) -> dict:
    """One ListObjectsV2 request, its refusals worded for the user."""
    from botocore.exceptions import ClientError

    try:
        return client(options).list_objects_v2(**request)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            raise InsectError(f"bucket {request['Bucket']!r} does not exist ({uri})") from None
        if code in DENIED:  # at once: retrying cannot grant a permission
            problem = f"access denied to {uri}: check the AWS credentials ({code})"
            raise InsectError(problem) from None
        raise


def has_objects(options: S3Options | None, bucket: str, prefix: str) -> bool:
    """Whether any key starts with `prefix` (one request)."""
    request = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": 1}
    uri = f"s3://{bucket}/{prefix}"
    page = retry.retrying(lambda: _list(options, request, uri), uri)
    return bool(page.get("KeyCount") or page.get("Contents"))
