import errno
import fcntl
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import pytest

from insectlib import storage
from insectlib.config import MOST_FILE_BYTES
from insectlib.data import inputs
from insectlib.errors import ImageError, InsectError, StorageUnavailable
from insectlib.layout import LOCK_FILE, WRITING_PREFIX
from insectlib.storage.listing import LINKED_FOLDER
from insectlib.storage.lock import LocalLock, holder


def listing_blocks(root: str, rows: int):
    """The path tables the read tasks of a listing of `root` yield, in order."""
    parts = inputs.plan_listing(root, storage.S3Options())
    return [t for i, part in enumerate(parts) for t in inputs.read_part(i, part, rows, None, None)]


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_listing_is_recursive_case_insensitive_and_skips_hidden(tmp_path):
    for name in [
        "a.jpg",
        "B.JPEG",
        "sub/c.Png",
        "sub/deeper/d.webp",
        "notes.txt",
        ".hidden.jpg",
        "sub/.DS_Store",
    ]:
        _touch(tmp_path / name)
    (tmp_path / "dir.jpg").mkdir()  # a directory with an image name is not a file
    paths = [
        p for block in listing_blocks(str(tmp_path), 256) for p in block.column("path").to_pylist()
    ]
    assert sorted(paths) == sorted(
        str(tmp_path / n) for n in ["a.jpg", "B.JPEG", "sub/c.Png", "sub/deeper/d.webp"]
    )


def test_a_link_to_a_folder_is_said_not_dropped(tmp_path):
    """A link to a folder (`ln -s /mnt/photos/beetles`) was left out without a word by the
    walk, and taken for a file, then for a non-image, by a level's listing: neither walks
    it (a loop, or a tree listed twice), and both give it as a folder left out."""
    _touch(tmp_path / "real" / "a.jpg")
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deeper").symlink_to(tmp_path / "real")
    found = list(storage.iter_files(str(tmp_path)))
    assert found == [str(tmp_path / "linked"), str(tmp_path / "real" / "a.jpg"),
                     str(tmp_path / "sub" / "deeper")]  # fmt: skip
    assert [getattr(f, "reason", None) for f in found] == [LINKED_FOLDER, None, LINKED_FOLDER]
    level = list(storage.iter_level_files(str(tmp_path)))
    assert level == [str(tmp_path / "linked")] and level[0].reason == LINKED_FOLDER


def test_glob_and_single_file(tmp_path):
    for name in ["x1.jpg", "x2.jpg", "y.jpg"]:
        _touch(tmp_path / name)
    assert sorted(storage.iter_files(str(tmp_path / "x*.jpg"))) == [
        str(tmp_path / "x1.jpg"),
        str(tmp_path / "x2.jpg"),
    ]
    assert list(storage.iter_files(str(tmp_path / "y.jpg"))) == [str(tmp_path / "y.jpg")]
    # Hidden names below the pattern's folder are skipped, as by a folder's walk and the
    # shell's * and **; a pattern that names one keeps it.
    for name in ["sub/.cache/h.jpg", "sub/z/.k.jpg", "sub/z/k.jpg", ".top/t.jpg"]:
        _touch(tmp_path / name)
    found = storage.iter_files(str(tmp_path / ".top" / "**" / "*.jpg"))
    assert list(found) == [str(tmp_path / ".top" / "t.jpg")]  # above the pattern: as named
    assert list(storage.iter_files(str(tmp_path / "sub" / "**" / "*.jpg"))) == [
        str(tmp_path / "sub" / "z" / "k.jpg")
    ]
    assert list(storage.iter_files(str(tmp_path / "sub" / ".cache" / "*.jpg"))) == [
        str(tmp_path / "sub" / ".cache" / "h.jpg")
    ]


def test_missing_location_and_unknown_scheme(tmp_path):
    with pytest.raises(InsectError, match="not found: .*nope"):
        list(storage.iter_files(str(tmp_path / "nope")))
    with pytest.raises(InsectError, match="unsupported location 'gs://b/x'"):
        storage.filesystem("gs://b/x")


def test_listing_blocks_are_bounded(tmp_path):
    for i in range(10):
        _touch(tmp_path / f"{i}.jpg")
    sizes = [b.num_rows for b in listing_blocks(str(tmp_path), 4)]
    assert sizes == [4, 4, 2]


def test_local_paths_warn_on_multi_node_clusters():
    from insectlib.runtime.connect import local_path_warnings

    local = {"--storage": "/runs", "--output": "/models/m"}
    assert local_path_warnings(local, nodes=1) == []
    warnings = local_path_warnings(local, nodes=3)
    assert len(warnings) == 2 and "--storage /runs is a local path" in warnings[0]
    assert local_path_warnings({"--output": "s3://b/m", "--storage": "s3://b/r"}, nodes=3) == []


def test_a_lock_taken_an_instant_ago_names_its_holder_once_written(tmp_path):
    """Two runs started at one instant: the second may find the lock held but its file not
    yet written. It waits a moment for the holder's name, and says 'another insect run'
    rather than '?' where none comes."""
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, nothing written yet
    try:
        with pytest.raises(InsectError, match=r"in use by another insect run: wait"):
            LocalLock(str(out)).acquire(holder("classify"))
        late = {**holder("train"), "pid": 4242}
        threading.Timer(0.2, os.pwrite, (fd, json.dumps(late).encode(), 0)).start()
        with pytest.raises(InsectError, match=r"in use by insect train \(host \S+, pid 4242"):
            LocalLock(str(out)).acquire(holder("classify"))
    finally:
        os.close(fd)


def test_a_fifo_where_the_lock_goes_is_refused_not_waited_on(tmp_path):
    """Something not a file at the lock's path (a FIFO) is refused in one line by a run,
    and read as no holder by the check of a run name, without waiting for a writer (a
    FIFO's open waits for one) or reading it (reads at an offset fail on a FIFO)."""
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / LOCK_FILE)
    with pytest.raises(
        InsectError, match=f"^{out / LOCK_FILE} is not a file, so not insect's lock"
    ):
        LocalLock(str(out)).acquire(holder("classify"))
    found: list = []
    reader = threading.Thread(target=lambda: found.append(LocalLock(str(out)).held_by()))
    reader.start()
    reader.join(timeout=10)
    blocked = reader.is_alive()
    if blocked:  # waiting to open the FIFO: a writer lets it go
        os.close(os.open(out / LOCK_FILE, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert not blocked and found == [None]


def test_a_read_holds_no_more_than_the_file(tmp_path):
    """--max-file-bytes is a cap, not a size to allocate: a small file reads whole under the
    largest cap allowed (a read asked for the cap at once, a MemoryError past the RAM)."""
    image = tmp_path / "small.jpg"
    image.write_bytes(b"x" * 1000)
    assert storage.read_input(str(image), MOST_FILE_BYTES) == b"x" * 1000
    with pytest.raises(ImageError, match="file too large: more than --max-file-bytes 999"):
        storage.read_input(str(image), 999)


def test_a_storage_failure_keeps_its_problem_apart_from_the_advice():
    """The CLI shows classify the advice to --resume and other commands the problem alone;
    both survive the pickling that carries the error out of a Ray task."""
    error = pickle.loads(pickle.dumps(StorageUnavailable("cannot read s3://b/x: SlowDown")))
    assert error.problem == "cannot read s3://b/x: SlowDown"
    assert str(error) == f"cannot read s3://b/x: SlowDown. {StorageUnavailable.ADVICE}"


# storage.write_bytes under a file size limit, as a full disk would fail it: EFBIG, not the
# SIGXFSZ that would kill the process.
WRITE_OVER_LIMIT = """
import resource, signal, sys
from insectlib import storage
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    storage.write_bytes(sys.argv[1], b"x" * 100_000)
except OSError as e:
    print(e.errno, e.filename)
"""


def test_a_local_write_that_fails_keeps_the_old_file_and_names_it(tmp_path):
    """A full disk while `_SUCCESS` or `_summary.json` was written left it empty or cut,
    and the next `insect summary` refused a complete output: a local file is now written
    beside and renamed, and the failure names the file meant, not the one beside it."""
    target = tmp_path / "_SUCCESS"
    target.write_text("the old one")
    result = subprocess.run([sys.executable, "-c", WRITE_OVER_LIMIT, str(target)],
                            capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert result.stdout.split() == [str(errno.EFBIG), str(target)], result.stderr[-2000:]
    assert target.read_text() == "the old one" and os.listdir(tmp_path) == ["_SUCCESS"]
    # What a writer killed mid-write leaves beside: bookkeeping, neither output nor foreign
    # (--resume and --overwrite would refuse a file insect did not write).
    (tmp_path / f"{WRITING_PREFIX}99.part-x.parquet").write_bytes(b"PAR1 cut")
    assert [storage.entry_name(e) for e in storage.list_entries(str(tmp_path), None)] == [
        "_SUCCESS"
    ]


def test_a_local_write_keeps_the_mode_and_leaves_nothing_beside_when_stopped(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    target.chmod(0o640)
    storage.write_bytes(str(target), b"new")
    assert target.read_text() == "new" and target.stat().st_mode & 0o777 == 0o640
    (tmp_path / "opened.json").write_text("as open() makes it")  # a new file: the umask's mode
    storage.write_bytes(str(tmp_path / "fresh.json"), b"new")
    assert (tmp_path / "fresh.json").stat().st_mode == (tmp_path / "opened.json").stat().st_mode
    (tmp_path / "opened.json").unlink()
    (tmp_path / "fresh.json").unlink()

    def stopped(*args):  # a Ctrl-C (or a SIGTERM, taken as one) just before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(str(target), b"newer")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_local_write_reaches_the_disk_before_its_name_and_its_name_before_the_next(
    tmp_path, monkeypatch
):
    """Renamed before its data was flushed, a part could be empty after a power loss while
    the `_SUCCESS` written after it survived: each write flushes its file, renames it, then
    flushes the folder; a folder its file system cannot flush (EINVAL) is no failure."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("flush", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", os.path.basename(source).startswith(WRITING_PREFIX), target))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = str(tmp_path / "_SUCCESS")
    storage.write_bytes(target, b"{}")
    (flushed, beside), *rest = events
    assert flushed == "flush" and os.path.basename(beside).startswith(WRITING_PREFIX)
    assert rest == [("rename", True, target), ("flush", str(tmp_path))]
    events.clear()
    storage.write_bytes(str(tmp_path / "thumb.jpg"), b"jpeg", durable=False)
    assert events == [("rename", True, str(tmp_path / "thumb.jpg"))]

    def unsupported(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", unsupported)
    storage.write_bytes(target, b"{ }")
    assert (tmp_path / "_SUCCESS").read_bytes() == b"{ }"
    assert sorted(os.listdir(tmp_path)) == ["_SUCCESS", "thumb.jpg"]


def test_a_name_with_glob_characters_is_a_pattern_only_where_nothing_has_it(tmp_path, monkeypatch):
    """A folder named 'glob [2023]' is read as a folder, but the output checks took it for
    a pattern of its parent: every output beside it was 'inside the input', and an output
    named 'res[1]' 'contained' any input beside it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "glob [2023]").mkdir()
    (tmp_path / "photos" / "a").mkdir(parents=True)
    storage.check_location("og1", {"the input": "glob [2023]"}, ("the input",))
    storage.check_location("res[1]", {"the input": "photos"}, ("the input",))
    storage.check_location("glob [2023]/../page [v2]", {"the input": "photos/a"}, ("the input",))
    with pytest.raises(InsectError, match=r"^--output glob \[2023\]/out is inside the input"):
        storage.check_location("glob [2023]/out", {"the input": "glob [2023]"}, ("the input",))
    # A pattern's files lie in its fixed leading folders, wherever its first glob part is.
    with pytest.raises(InsectError, match="is inside the input"):
        storage.check_location("photos/out", {"the input": "photos/*/x.jpg"}, ("the input",))
    with pytest.raises(InsectError, match="contains the input"):
        storage.check_location("photos", {"the input": str(tmp_path / "photos" / "*.jpg")})
    with pytest.raises(InsectError, match="is inside the input"):
        storage.check_location("out", {"the input": "*.jpg"}, ("the input",))
    # An S3 key with glob characters is a pattern, as its listing takes it.
    with pytest.raises(InsectError, match="is inside the input"):
        storage.check_location("s3://b/p/out", {"the input": "s3://b/p/**/*.jpg"}, ("the input",))
    storage.check_location("s3://b/q", {"the input": "s3://b/p/*.jpg"}, ("the input",))


def test_an_s3_output_without_a_bucket_says_so():
    """`--output s3://` was called a bucket root, 'write to a prefix such as s3:/predictions'."""
    for given in ("s3://", "s3:///"):
        with pytest.raises(
            InsectError, match=f"^--output {given} names no bucket: give s3://BUCKET/PREFIX$"
        ):
            storage.check_location(given, {})
    with pytest.raises(
        InsectError, match="is a bucket root; write to a prefix such as s3://b/predictions"
    ):
        storage.check_location("s3://b/", {})


@pytest.mark.parametrize("ahead", [2, 4])
def test_prefetch_keeps_its_threads_busy_behind_a_slow_oldest_item(ahead):
    """Results come in order, and never more than `ahead` items are started and not yet
    consumed. Behind an oldest item that takes long, the other thread goes on with the next
    ones only where `ahead` is above the threads: with as many as threads it waits (the
    oldest item here waits a second for the three after it to start)."""
    started, consumed = threading.Event(), [0]
    seen: list[int] = []

    def compute(i: int) -> tuple[int, bool]:
        assert i - consumed[0] < ahead, (i, consumed[0])
        seen.append(i)
        if len(seen) >= 4:
            started.set()
        return i, started.wait(1) if i == 0 else True

    results = []
    for result in storage.prefetch(compute, range(12), threads=2, ahead=ahead):
        results.append(result)
        consumed[0] += 1
    assert [i for i, _ in results] == list(range(12))
    assert results[0][1] is (ahead == 4)


def test_prefetch_closed_early_drops_the_items_not_started():
    """A consumer that stops after the first result waits only for the items already being
    computed (the first two, then one a thread at most), not for the rest of its 8."""
    computed: list[int] = []

    def compute(i: int) -> int:
        time.sleep(0.05)
        computed.append(i)
        return i

    results = storage.prefetch(compute, range(20), threads=2, ahead=8)
    assert next(results) == 0
    results.close()
    assert len(computed) <= 4, computed
