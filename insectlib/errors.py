"""The exception types a user is meant to read."""

from __future__ import annotations

import os


class InsectError(Exception):
    """A problem with the user's input or environment, worded so they can act on it.

    The CLI prints the message and exits non-zero without a traceback; anything else
    escaping is a bug in insect.
    """


class ImageError(ValueError):
    """One input file that cannot be used (unreadable, not a regular file, too large, not an
    image of an accepted format); the message is the text of its `error` row. Classification
    records it and goes on; training skips and counts the file."""


class StorageUnavailable(InsectError):
    """Reading failed for a reason outside the file itself (throttling, timeouts, server
    errors, expired or missing credentials) and retries did not help. It stops the run
    rather than being recorded as the file's fate: the rows written are kept, and
    `--resume` continues once the cause is fixed. `problem` is the failure alone, for a
    command that writes no rows (the CLI shows the advice to classify only)."""

    # True too of a run stopped before its first row (its listing failed).
    ADVICE = "Fix the cause and rerun with --resume: the rows written are kept, not redone"

    def __init__(self, problem: str):
        super().__init__(problem)  # the one argument: pickled into and out of Ray tasks
        self.problem = problem  # not `cause`: Ray's wrapper of a task's error has that name

    def __str__(self) -> str:
        return f"{self.problem}. {self.ADVICE}"


class RunStopped(InsectError):
    """A run the cluster stopped under it (a worker, an actor or the head gone for good),
    which a resume continues once the cluster is up: said with the way on of the block it
    stopped in, as a Ctrl-C is (`console.on_interrupt` sets `way_on`). Raised in the
    driver only."""

    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem
        self.way_on = ""  # how to go on: "" where the command names no flags (the demo)

    def __str__(self) -> str:
        return (
            f"{self.problem}; once the cluster is up, {self.way_on}"
            if self.way_on
            else self.problem
        )


def file_problem(error: BaseException) -> str | None:
    """One line for an OSError that names its file or folder (a full disk, a read-only
    mount, a file where a folder goes): the machine's state, worded by the OS, not a bug in
    insect. None for any other error."""
    if not isinstance(error, OSError) or error.errno is None:
        return None
    if not error.filename or not isinstance(error.filename, str | bytes | os.PathLike):
        return None  # none, or a file descriptor's number
    name = os.fsdecode(error.filename).encode("utf-8", "backslashreplace").decode()
    return f"{name}: {error.strerror or os.strerror(error.errno)}"
