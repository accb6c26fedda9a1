"""One run per output at a time: a lock file in the output (`layout.LOCK_FILE`), held for the
run's life and naming its holder (host, process, start), so that a second run on the same
output is refused with one line instead of both writing rows.

Local outputs: an OS lock (`fcntl.flock`) on the file, which the kernel drops when the
holder dies, so a lock left by a killed run is taken over (and said). S3 outputs: the
lock object is created with a conditional write (`If-None-Match: *`), refreshed every
HEARTBEAT_S with `If-Match` on its ETag, and taken over once it is older than STALE_S
(its holder stopped refreshing it: killed, or its machine gone). `refuse_if_held` asks who
holds one without taking it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from insectlib.config import S3Options
from insectlib.errors import InsectError
from insectlib.layout import LOCK_FILE
from insectlib.storage import buckets, retry
from insectlib.storage.files import bucket_and_key, is_s3, join, not_a_folder

HEARTBEAT_S = 30.0
STALE_S = 180.0  # six missed heartbeats
# S3's answers to a conditional write whose condition does not hold (409: another
# conditional write to the same key was in flight).
CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict")
BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's answers while another holds it


def holder(command: str) -> dict:
    """Who holds a lock: this process, now."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "command": command,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def describe(found: dict) -> str:
    """A holder as the user reads it."""
    if not isinstance(found, dict) or not found:
        return "another insect run"
    return (
        f"insect {found.get('command', '?')} (host {found.get('host', '?')}, pid "
        f"{found.get('pid', '?')}, started {found.get('started', '?')})"
    )


@contextlib.contextmanager
def output_lock(
    output: str,
    command: str,
    s3: S3Options | None = None,
    say=print,
    instead: str | None = "choose another folder",
) -> Iterator[OutputLock]:
    """Hold the lock of `output` for the block; refuse (InsectError) while another run
    holds it, advising to wait (or `instead`, where there is another way). `say` tells the
    user when a dead run's lock is taken over."""
    lock = lock_of(output, s3, instead)
    taken_over = lock.acquire(holder(command))
    if taken_over:
        say(f"taking over the lock of {output} from {describe(taken_over)}, which is gone")
    try:
        yield lock
    finally:
        lock.release()


def refuse_if_held(output: str, s3: S3Options | None, instead: str | None) -> None:
    """Refuse (InsectError, as `output_lock` would) while a run holds the lock of `output`,
    without taking it: nothing is written, and a lock that cannot be read is not held."""
    lock = lock_of(output, s3, instead)
    found = lock.held_by()
    if found is not None:
        raise InsectError(lock.busy(found))


def lock_of(output: str, s3: S3Options | None, instead: str | None) -> OutputLock:
    """The lock of `output` (not taken), refusing with `instead` as the other way."""
    lock = S3Lock(output, s3) if is_s3(output) else LocalLock(output)
    lock.instead = instead
    return lock


class OutputLock:
    """The interface of a held lock."""

    output: str
    instead: str | None = "choose another folder"  # the advice beside waiting, if any

    def busy(self, found: dict) -> str:
        """The refusal while `found` holds the lock."""
        other = f", or {self.instead}" if self.instead else ""
        return f"{self.output} is in use by {describe(found)}: wait for it to finish{other}"

    def lost(self) -> str | None:
        """Why the lock is no longer ours (another run took it over), or None."""
        return None

    def held_by(self) -> dict | None:
        """Who holds the lock now, read without taking it; None where no one is known to."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse (InsectError) to go on writing when the lock was lost."""
        why = self.lost()
        if why:
            raise InsectError(why)


class LocalLock(OutputLock):
    def __init__(self, output: str):
        self.output = output
        self.path = os.path.join(output, LOCK_FILE)
        self.created = not os.path.exists(output)
        self.fd: int | None = None

    def acquire(self, me: dict) -> dict | None:
        """Take the lock; the holder it was left by, when a gone run left one."""
        why = not_a_folder(self.output)
        if why:
            raise InsectError(f"{self.output} {why}; give a folder")
        try:
            os.makedirs(self.output, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except NotADirectoryError:  # a file above it
            raise InsectError(f"{self.output} lies under a file, not a folder") from None
        except OSError as e:
            raise InsectError(f"cannot write to {self.output}: {e.strerror or e}") from None
        if not _is_file(fd):  # a FIFO or device someone put there: never insect's lock
            os.close(fd)
            raise InsectError(f"{self.path} is not a file, so not insect's lock: remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in BUSY:
                found = _written_holder(fd)
                os.close(fd)
                raise InsectError(self.busy(found)) from None
            os.close(fd)
            raise
        if not _same_file(fd, self.path):  # released (and removed) by its holder meanwhile
            os.close(fd)
            return self.acquire(me)
        left = _read_json(os.pread(fd, 4096, 0)) or None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
        except OSError as e:  # a full disk: the lock is held by no one, the folder unusable
            os.close(fd)
            raise InsectError(f"cannot write to {self.output}: {e.strerror or e}") from None
        self.fd = fd
        return left

    def held_by(self) -> dict | None:
        try:  # O_NONBLOCK: a FIFO there must not wait for a writer
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # no lock file, or not one to read: not known to be held
            return None
        if not _is_file(fd):
            os.close(fd)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # let go as fd closes
        except OSError as e:
            return _written_holder(fd) if e.errno in BUSY else None
        finally:
            os.close(fd)
        return None

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # still holding it: no one else can have it
        os.close(self.fd)
        self.fd = None
        if self.created:  # a run that wrote nothing leaves no folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self.output)


class S3Lock(OutputLock):
    def __init__(self, output: str, s3: S3Options | None):
        self.output, self.s3 = output, s3
        self.bucket, prefix = bucket_and_key(output)
        self.key = f"{prefix}/{LOCK_FILE}" if prefix else LOCK_FILE
        self.uri = join(output, LOCK_FILE)
        self.etag: str | None = None
        self.body = b""
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.why_lost: str | None = None
        self.age: float | None = None  # of the lock object as last read, in seconds

    def busy(self, found: dict) -> str:
        """The refusal, and when the lock may be taken over: a dead holder's pid says
        nothing here, as its host name may name another machine."""
        said = super().busy(found)
        if self.age is None:
            return said
        left = math.ceil(max(0.0, STALE_S - self.age))
        return (
            f"{said} (a run that stopped without ending gives it up {STALE_S:.0f} s after its "
            f"last heartbeat: in {left} s)"
        )

    def acquire(self, me: dict) -> dict | None:
        self.body = json.dumps(me).encode()
        if self._put(IfNoneMatch="*"):
            self._start_heartbeat()
            return None
        found, etag, age = self._read()
        if age < STALE_S:
            raise InsectError(self.busy(found))
        if not self._put(IfMatch=etag):  # another run took it over first
            raise InsectError(self.busy(self._read()[0]))
        self._start_heartbeat()
        return found

    def held_by(self) -> dict | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # asked once: a lock not known to be held is not worth the retries' wait
            got = buckets.client(self.s3).get_object(Bucket=self.bucket, Key=self.key)
            self.age = time.time() - got["LastModified"].timestamp()
            return _read_json(got["Body"].read()) if self.age < STALE_S else None
        except (ClientError, BotoCoreError):  # none, or not one to read
            return None

    def _put(self, **condition) -> bool:
        """Write the lock object under `condition`; False where the condition failed."""
        from botocore.exceptions import ClientError

        client = buckets.client(self.s3)
        request = {"Bucket": self.bucket, "Key": self.key, "Body": self.body, **condition}

        def put():
            try:
                return client.put_object(**request)
            except ClientError as e:  # the condition failed: an answer, not a fault to retry
                if e.response.get("Error", {}).get("Code") in CONDITION_FAILED:
                    return None
                raise

        answer = retry.retrying(put, self.uri, "write")
        if answer is None:
            return False
        self.etag = answer["ETag"]
        return True

    def _read(self) -> tuple[dict, str, float]:
        """The lock object's holder, ETag and age in seconds."""
        client = buckets.client(self.s3)
        got = retry.retrying(lambda: client.get_object(Bucket=self.bucket, Key=self.key), self.uri)
        self.age = time.time() - got["LastModified"].timestamp()
        return _read_json(got["Body"].read()), got["ETag"], self.age

    def _start_heartbeat(self) -> None:
        def beat():
            while not self.stop.wait(HEARTBEAT_S):
                try:
                    if not self._put(IfMatch=self.etag):
                        self.why_lost = (
                            f"another run took over {self.uri} while this one ran (its "
                            "refreshes were late): nothing more is written; check both runs"
                        )
                        return
                except Exception:  # a refresh that fails now may succeed at the next beat
                    continue

        self.thread = threading.Thread(target=beat, daemon=True)
        self.thread.start()

    def lost(self) -> str | None:
        return self.why_lost

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        if self.etag and not self.why_lost:
            client = buckets.client(self.s3)
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)


def _is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _written_holder(fd: int, wait_s: float = 1.0) -> dict:
    """The holder a held lock file names. Its holder writes it just after taking the lock:
    one that has not yet is waited for a moment, then said to be unknown."""
    deadline = time.monotonic() + wait_s
    while not (found := _read_json(os.pread(fd, 4096, 0))) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _read_json(data: bytes) -> dict:
    try:
        found = json.loads(data.decode(errors="replace") or "{}")
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}
