"""Storage: local paths and s3:// URIs alike. This package's API, by module:

- `files`: reading and writing files through fsspec, the bounded reads of input files,
  storage errors worded for the user;
- `listing`: listing folders and prefixes as streams;
- `buckets`: botocore's ListObjectsV2 pages (what `listing` uses for s3://);
- `retry`: the one retry policy, with its budget;
- `locations`: where outputs may go (never inside an input, never a file) and the lock
  that keeps one run per output.
"""

from insectlib.config import S3Options
from insectlib.storage.files import (
    FILE_ERRNOS,
    READ_AHEAD,
    bucket_and_key,
    check_bucket,
    entry_name,
    exists,
    filesystem,
    from_printable,
    is_s3,
    is_utf8,
    join,
    list_entries,
    not_found,
    prefetch,
    printable,
    pyarrow_filesystem,
    read_bytes,
    read_head,
    read_input,
    read_inputs,
    refuse_nul,
    sha256,
    to_uri,
    user_errors,
    write_bytes,
    write_file,
)
from insectlib.storage.listing import (
    Level,
    UnlistedFolder,
    is_dir,
    is_glob,
    iter_files,
    iter_level_files,
    iter_tree,
    list_level,
)
from insectlib.storage.locations import (
    check_location,
    check_not_inside,
    folder_holding,
    folder_problem,
    location_key,
    within,
)

__all__ = [
    "FILE_ERRNOS",
    "READ_AHEAD",
    "Level",
    "S3Options",
    "UnlistedFolder",
    "bucket_and_key",
    "check_bucket",
    "check_location",
    "check_not_inside",
    "entry_name",
    "exists",
    "filesystem",
    "folder_holding",
    "folder_problem",
    "is_dir",
    "is_glob",
    "is_s3",
    "is_utf8",
    "list_entries",
    "not_found",
    "iter_files",
    "iter_level_files",
    "iter_tree",
    "join",
    "list_level",
    "location_key",
    "prefetch",
    "from_printable",
    "printable",
    "pyarrow_filesystem",
    "read_bytes",
    "read_head",
    "read_input",
    "read_inputs",
    "refuse_nul",
    "sha256",
    "to_uri",
    "user_errors",
    "within",
    "write_bytes",
    "write_file",
]
