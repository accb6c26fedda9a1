"""The `insect` command: a thin argparse layer over the library.

Each flag is built from its field in `insectlib.config` (name, type, default, choices, help
text); this module only groups them. Flags are parsed and checked before anything heavy is
imported: a wrong value costs a fraction of a second, not torch's and Ray's start-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import traceback
import types
import typing

from insectlib import config, layout
from insectlib.config import S3Options
from insectlib.errors import InsectError, StorageUnavailable, file_problem

# Flags renamed, refused with their new name.
RENAMED = {"--no-calibration": "--no-temperature", "--int8-calibration": "--int8-images"}

# The flags of a command, {group title: fields}, in the order --help shows them.
Groups = dict[str, tuple[str, ...]]
# fmt: off
S3: Groups = {"S3": ("endpoint_url", "anonymous")}
LIMITS: Groups = {"limits on each input file": ("max_file_bytes", "max_pixels")}
CLUSTER: Groups = {
    "cluster and output": ("address", "gpu", "wait_for_nodes", "overwrite", "verbose")
}
ACTORS: Groups = {
    "model actors": (
        "precision", "int8_images", "batch_size", "max_actors", "cpus_per_actor", "decode"
    )
}

COMMANDS = {
    "train": (
        config.TrainConfig,
        {
            "data and model": (
                "data", "labels", "new_classes",  # labels, new_classes: issue 28
                "output", "arch", "weights", "freeze", "image_size", "val_fraction", "seed",
            ),
            "optimisation": (
                "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "augment", "cache_features", "precision",
            ),
            "workers": (
                "workers", "cpus_per_worker", "placement", "loader_workers", "progress_every",
                "decode",
            ),
            "run storage and recovery": (
                "storage", "name", "resume", "max_failures", "keep_checkpoints",
            ),
        }  # fmt: skip
        | LIMITS
        | CLUSTER
        | S3,
        "fine-tune a torchvision model on a labelled folder tree or a labels table",
        "Fine-tune on ROOT/<class>/<images> (or ROOT/train + ROOT/val|test), local or s3://, "
        "and/or on a --labels table of path,label rows, with Ray Train data-parallel workers.",
    ),
    "classify": (
        config.ClassifyConfig,
        {
            "input and output": (
                "input", "manifest", "model", "output", "rows_per_file", "resume",
                "max_error_fraction",
            ),
            "what each row holds": ("use_temperature", "top_k", "embeddings", "min_score"),
            "model actors": (*ACTORS["model actors"], "min_actors", "compile"),
        }  # fmt: skip
        | LIMITS
        | CLUSTER
        | S3,
        "classify images into Parquet with Ray Data",
        "Classify every image under INPUT (a directory, a glob or an s3:// prefix) or listed "
        "in --manifest, and write one Parquet row per file to --output. The input is listed "
        "while it is classified: folders and prefixes a level or two down are listed in "
        "parallel Ray tasks.",
    ),
    "evaluate": (
        config.EvaluateConfig,
        {"input and output": ("data", "model", "output")} | ACTORS | LIMITS | CLUSTER | S3,
        "accuracy, per-class precision/recall/F1 and confusion matrix on a labelled tree",
        "Classify the labelled images of DATA (ROOT/<class>/*; with ROOT/train + "
        "ROOT/val|test, the held-out folder only) with the classification pipeline and write "
        f"{', '.join(layout.EVALUATION_FILES)} and the predictions ({layout.PREDICTIONS_DIR}/) "
        "to --output.",
    ),
    "visualize": (
        config.VisualizeConfig,
        {"input and output": ("image", "model", "layers", "output", "max_maps")} | S3,
        "feature maps of chosen layers for one image, as PNG grids",
        "Run one image through the model and draw the activations of the chosen layers, one "
        "PNG grid per layer. Layers are numbered as the model's leaf modules in definition "
        "order (containers such as Sequential do not count): for VGG-16, 0-30 are the indices "
        "of model.features (conv, ReLU, max-pool), 31 the average pool, 32-38 the classifier. "
        "Asking for a layer that does not exist lists them all.",
    ),
    "summary": (
        config.SummaryConfig,
        {"output": ("predictions",)} | S3,
        "what a classification output holds: rows per class, scores, errors, speed",
        "Print the summary of a classification output: its _summary.json, or for an output "
        "without one (written by an older insect, or interrupted) a summary computed from "
        "its Parquet files.",
    ),
    # --- insect report (issue 28) ---
    "report": (
        config.ReportConfig,
        {"input and output": ("predictions", "html", "gallery_size")}
        | LIMITS
        | {"cluster and output": ("address", "overwrite", "verbose")}
        | S3,
        "an HTML page to review a classification or evaluation and correct its labels",
        "Write a page (DIR/index.html, opened from disk, nothing fetched from the network) "
        "showing the run, a gallery of thumbnails per predicted class (the least confident "
        "first), the images below --min-score, the files that failed and, for an evaluation, "
        "the confusion matrix with the images in each cell. Each thumbnail can be given its "
        "true class; the page downloads the corrections as a CSV for `insect train --labels`.",
    ),
    "demo": (
        config.DemoConfig,
        {"demo": ("workdir", "image_size", "verbose")},
        "generate a sample set, train, classify, show the results",
        "The whole product on generated images, with no network.",
    ),
}
# fmt: on


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 5,30, got {text!r}") from None


def _value_type(hint) -> type:
    """int for `int` or `int | None`, _int_list for `list[int]`, and so on."""
    if isinstance(hint, types.UnionType):
        hint = next(t for t in typing.get_args(hint) if t is not type(None))
    return _int_list if typing.get_origin(hint) is list else hint


def add_setting(group, cls: type, name: str) -> None:
    """The argument of field `name` of config class `cls`: flag, type, default, choices and
    help, all from the field."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta, hint = f.metadata, _value_type(typing.get_type_hints(cls)[name])
    help = meta.get("help")
    if hint is bool:
        # No default here: an absent flag leaves the field's own (and no "(default: True)"
        # beside --no-augment in --help).
        action = "store_false" if f.default else "store_true"
        flag = config.flag_name(f)
        group.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS, help=help)
        return
    kwargs = {"type": hint, "help": help}
    if "choices" in meta:
        kwargs["choices"] = meta["choices"]
    if "metavar" in meta:
        kwargs["metavar"] = meta["metavar"]
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not dataclasses.MISSING:
        kwargs["default"] = f.default_factory()
    if name in config.POSITIONAL:
        group.add_argument(name, nargs="?" if "default" in kwargs else None, **kwargs)
    else:
        required = "default" not in kwargs
        group.add_argument(config.flag_name(f), dest=name, required=required, **kwargs)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where there is none to show (None, "", a required flag)."""

    def _get_help_string(self, action):
        if action.default in (None, "") or action.required:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse's parser, its refusals as insect's own: one line, exit 2 (its subcommands'
    parsers are of this class too, in `commands` by name)."""

    commands: dict[str, argparse.ArgumentParser]

    def error(self, message: str):
        print(f"insect: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args=None, namespace=None):
        """argparse's, but flags no command has are refused by the command's parser, whose
        --help lists those it has (argparse's own refusal named `insect --help`)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            self.commands[parsed.command].error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="insect", description="Fine-tune and run image classifiers on Ray.")
    sub = ap.add_subparsers(dest="command", required=True)
    ap.commands = {}
    for command, (cls, groups, summary, description) in COMMANDS.items():
        p = ap.commands[command] = sub.add_parser(
            command, help=summary, description=description, formatter_class=HelpFormatter
        )
        for title, names in groups.items():
            group = p.add_argument_group(title)
            for name in names:
                owner = S3Options if name in S3Options.__dataclass_fields__ else cls
                add_setting(group, owner, name)
    return ap


def config_from(cls: type, args: argparse.Namespace):
    """The `cls` config from the parsed flags of its fields (and of S3Options for `s3`)."""
    values = vars(args)
    options = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
    if "s3" in cls.__dataclass_fields__:
        options["s3"] = config_from(S3Options, args)
    return cls(**options)


def refuse_renamed(argv: list[str]) -> None:
    """A flag of an older insect: one line with its new name, exit 2."""
    for arg in argv:
        old = arg.split("=", 1)[0]
        if old in RENAMED:
            print(f"insect: error: {old} is now {RENAMED[old]}", file=sys.stderr)
            sys.exit(2)


def entry(argv: list[str] | None = None, job: bool = False) -> typing.NoReturn:
    """A process's `insect` (the console script, jobs/*.py): `main`'s status, its exit
    status. A SIGTERM from main's end on is let go: Python's own end puts back the default
    action of a signal it handles, and one then killed the process (exit 143)."""
    code = main(argv, job, own_process=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def main(argv: list[str] | None = None, job: bool = False, own_process: bool = False) -> int:
    """Run `insect ARGV`; `job`: as a Ray job's entry point (jobs/*.py); `own_process`: the
    process ends with it (`entry`'s). Its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    refuse_renamed(argv)
    args = parser().parse_args(argv)
    try:
        cfg = config.absolute_paths(config_from(COMMANDS[args.command][0], args), job=job)
        cfg.validate()  # before anything heavy is imported
        from insectlib.cli import commands

        commands.run(args.command, cfg, own_process)
    except StorageUnavailable as e:  # its advice, --resume keeps the rows, is classify's
        print(f"insect: error: {e if args.command == 'classify' else e.problem}", file=sys.stderr)
        return 2
    except InsectError as e:
        print(f"insect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # its text, if any: how to continue
        print(f"insect: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `insect summary OUT | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        problem = file_problem(e)
        if not problem:  # no file named: a bug in insect, its traceback
            traceback.print_exc()
            return 1
        print(f"insect: error: {problem}", file=sys.stderr)
        return 2
    except Exception:  # a bug in insect: the whole traceback, on the console
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    entry()
