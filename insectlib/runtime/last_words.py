"""The line a command's console gets when its process ends without a word: Ray's C++ core
ends the driver at once (exit 1, no Python code runs) when it loses its cluster's GCS, and
a signal can kill it; what it said went to the command's log, not to the console.

`console.log_to_file` runs this file as a process of its own (standard library only: it
starts in milliseconds), with the command's console as its stderr and a pipe from the
command as its stdin. The command writes DONE there as its log closes; the pipe's end
without DONE means that the command's process died, and this says so, with the error that
Ray's core logged last, if it logged one just before."""

from __future__ import annotations

import re
import signal
import sys
import time
from datetime import datetime

DONE = b"done"
HINT = b"hint "  # a line from the command: how to go on (empty: nothing to say)
RECENT_S = 3  # an error logged this close to the end is taken as its cause (Ray's, as it ends)
TAIL_BYTES = 1 << 16
# Ray's C++ errors: [2026-12-07 12:53:16,309 E 28158 28245] rpc_client.h:204: message (not
# those it calls info messages, which it logs as errors too)
RAY_ERROR = re.compile(
    rb"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ [EF] \d+ \d+\] \S+: (?!:info_message:)(.+)$", re.M
)


def cause(log: str, now: float) -> str | None:
    """The last error Ray's core logged in `log`, if within RECENT_S of `now` (local time,
    as Ray writes it), in its first two sentences."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - TAIL_BYTES))
            found = RAY_ERROR.findall(f.read())
    except OSError:
        return None
    if not found:
        return None
    stamp, message = found[-1]
    if now - datetime.strptime(stamp.decode(), "%Y-%m-%d %H:%M:%S").timestamp() > RECENT_S:
        return None
    sentences = message.decode(errors="replace").strip().split(". ")
    return ". ".join(sentences[:2]).rstrip(".")


def last_words(log: str, hint: str, now: float) -> str:
    """The console's line for a command whose process died, with `log` its log and `hint`
    how to go on."""
    why = cause(log, now)
    said = f"Ray's last error: {why}; " if why else ""
    go_on = f"{hint}; " if hint else ""
    return (
        "insect: error: stopped at once, without a word (as Ray stops a driver whose cluster "
        f"is gone, or as a signal does); {said}{go_on}its log: {log}"
    )


def main(log: str) -> None:
    # A Ctrl-C or SIGTERM to the command's process group is the command's to answer.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    said = sys.stdin.buffer.read().split(b"\n")
    if said[-1] != DONE:
        hints = [line[len(HINT) :] for line in said if line.startswith(HINT)]
        hint = (hints[-1:] or [b""])[0].decode(errors="replace")
        print(last_words(log, hint, time.time()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
