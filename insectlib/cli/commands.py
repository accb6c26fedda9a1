"""What each `insect` command runs, once its flags are parsed and checked (`main`), with its
log file when it starts Ray (`runtime.console`)."""

from __future__ import annotations

from insectlib.runtime import console
from insectlib.runtime.connect import client_address, run_as_driver

# Commands that start Ray, and the setting naming where each writes (its log goes there).
LOGGED = {
    "train": "output",
    "classify": "output",
    "evaluate": "output",
    "report": "html",  # issue 28
    "demo": "workdir",
}


def run(command: str, cfg, own_process: bool = False) -> None:
    """Run `command` with the checked config `cfg`; `own_process`: see `console.command_log`."""
    if command == "demo":  # where it writes, before its log file goes there
        from insectlib.cli.demo import check_workdir

        check_workdir(cfg.workdir)
    path = None
    if command in LOGGED and not cfg.verbose:
        output = getattr(cfg, LOGGED[command])
        if client_address(getattr(cfg, "address", None)):  # the output is the cluster's
            output = None
        path = console.log_path(command, output)
    with console.command_log(path, own_process):
        RUNNERS[command](cfg)


def _train(cfg) -> None:
    # The checks before torch is imported, so a wrong path costs a second; through a Ray
    # Client they run on the cluster, whose paths these are.
    from insectlib.training.preflight import named, preflight

    labelled = None
    if not client_address(cfg.address):
        cfg = named(cfg)
        labelled = preflight(cfg)
    from insectlib.training.trainer import fit

    run_as_driver(fit, cfg, labelled=labelled)


def _classify(cfg) -> None:
    from insectlib.classify.checks import check_run  # before torch, as for _train

    parts = None if client_address(cfg.address) else check_run(cfg)
    from insectlib.classify.pipeline import classify, print_summary

    print_summary(run_as_driver(classify, cfg, parts=parts))


def _evaluate(cfg) -> None:
    from insectlib.classify.checks import check_evaluation  # before torch, as for _train

    checked = not client_address(cfg.address)
    if checked:
        check_evaluation(cfg)
    from insectlib.classify.evaluate import evaluate, print_metrics

    print_metrics(run_as_driver(evaluate, cfg, checked=checked), cfg.output)


def _visualize(cfg) -> None:
    from insectlib.review.visualize import visualize

    for uri in visualize(cfg):
        console.say(uri)


def _summary(cfg) -> None:
    from insectlib.classify.summary import show

    console.say(show(cfg))


def _report(cfg) -> None:  # issue 28
    from insectlib.review.report import build_report, print_report

    print_report(run_as_driver(build_report, cfg))


def _demo(cfg) -> None:
    from insectlib.cli.demo import run_demo

    run_demo(cfg)


RUNNERS = {
    "train": _train,
    "classify": _classify,
    "evaluate": _evaluate,
    "visualize": _visualize,
    "summary": _summary,
    "report": _report,
    "demo": _demo,
}
