"""The line a command's console gets when its process ends without a word (before its
result, or in its end after it): Ray's C++ core ends a driver at once (exit 1, no Python
code runs) when its cluster's head stops under it, and a signal can kill it; what the
process said went to the command's log.

`console.log_to_file` runs this file as a process of its own (standard library only: it
starts in milliseconds), in a session of its own (a Ctrl-C or `timeout` aimed at the
command's process group is not for it), with the console as its stderr and a pipe from the
command as its stdin. The command writes how to go on (HINT lines), RESULT once its result
is said, and DONE as its log closes; the pipe's end without DONE means that the command's
process died (after RESULT: in its end, its result standing). The line comes
just after that process's end, not before: the shell may show its prompt first."""

from __future__ import annotations

import sys

DONE = b"done"
RESULT = b"result"
HINT = b"hint "  # a line from the command: how to go on (empty: nothing to say)


def last_words(log: str, hint: str) -> str:
    """The console's line for a command whose process died, with `log` its log and `hint`
    how to go on."""
    go_on = f"{hint}; " if hint else ""
    return (
        "insect: error: stopped at once, without a word (as Ray stops a driver whose cluster "
        f"is gone, or as a signal does); {go_on}its log: {log}"
    )


def after_result(log: str) -> str:
    """The console's line for a command whose process died in its end, its result said."""
    return (
        "insect: stopped at once after its result, which stands (as Ray stops a driver whose "
        f"cluster is gone, or as a signal does); its log: {log}"
    )


def main(log: str) -> None:
    said = sys.stdin.buffer.read().split(b"\n")
    if DONE in said:
        return
    hints = [line[len(HINT) :] for line in said if line.startswith(HINT)]
    hint = (hints[-1:] or [b""])[0].decode(errors="replace")
    line = after_result(log) if RESULT in said else last_words(log, hint)
    new_line = "\n" if sys.stderr.isatty() else ""  # a progress bar's line is not ended
    print(new_line + line, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
