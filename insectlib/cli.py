"""The `insect` command: a thin argparse layer over the library.

Each flag is built from its field in `insectlib.config` (name, type, default, choices), the
way Ray's benchmark configs generate theirs; this module adds only help text and groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from insectlib import config
from insectlib.errors import InsectError
from insectlib.runtime import run_as_driver
from insectlib.storage import S3Options


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 5,30, got {text!r}") from None


# Positional arguments; every other field is a --flag.
POSITIONAL = ("data", "input", "image", "predictions")
# The flags of a command: {group title: {field: help}}, in the order --help shows them.
Groups = dict[str, dict[str, str]]
# add_argument keywords beyond what the field gives.
EXTRA = {"input": {"nargs": "?"}, "layers": {"type": _int_list}, "endpoint_url": {"metavar": "URL"}}

RAY: Groups = {
    "cluster and storage": {
        "address": (
            "Ray cluster to use: auto, HOST:PORT or ray://HOST:PORT (default: $RAY_ADDRESS, as set "
            "by `ray job submit`, else a new local Ray)"
        ),
        "gpu": "one GPU per training worker / model actor",
        "precision": "compute precision; auto: bf16 where the hardware runs it fast",
        "overwrite": "replace an existing output",
    },
}


def without(groups: Groups, *names: str) -> Groups:
    """`groups` less the fields `names` (a command that explains them its own way)."""
    return {
        title: {k: v for k, v in fields.items() if k not in names}
        for title, fields in groups.items()
    }


S3: Groups = {
    "S3": {
        "endpoint_url": "S3-compatible endpoint URL (MinIO, Ceph, ...); default $AWS_ENDPOINT_URL",
        "anonymous": "unsigned S3 requests (public buckets)",
    },
}

LIMITS: Groups = {
    "limits on each input file": {
        "max_file_bytes": (
            "input files larger than this are not read (an error row; skipped in training)"
        ),
        "max_pixels": (
            "images with more pixels are not decoded (an error row; skipped in training); JPEGs "
            "count at the reduced scale they are decoded at"
        ),
    },
}

ACTORS: Groups = {
    "model actors": {
        "batch_size": "images per model call",
        "max_actors": (
            "model actors, at most (default: one per GPU with --gpu, else one per --cpus-per-actor "
            "CPUs of the cluster)"
        ),
        "cpus_per_actor": "CPUs per model actor (also its torch threads on CPU)",
        "precision": (
            "compute precision; int8 (CPU): post-training quantization, calibrated once and "
            "kept in the model directory; auto: int8 on an x86 CPU where the model "
            "directory holds a calibration that agrees with fp32 on at least "
            f"{config.INT8_AGREEMENT_MIN * 100:.0f}%% of its held-out images, else bf16 "
            "where the hardware runs it fast, else fp32"
        ),
        "int8_calibration": (
            "int8: images like those to classify (a folder, glob or s3:// prefix; up to "
            f"{config.CALIBRATION_IMAGES} are sampled, half to calibrate and half to measure "
            "agreement with fp32); default: the model's own validation images"
        ),
    },
}

TRAIN: Groups = (
    {
        "data and model": {
            "data": "labelled root: ROOT/<class>/* or ROOT/{train,val}/<class>/*",
            "output": "model directory to write (or s3://)",
            "arch": "torchvision classification model",
            "weights": (
                "imagenet (IMAGENET1K_V1 via the torch hub cache), random, or a state-dict file "
                "(.pth/.pt loaded weights_only, or .safetensors), local or s3://"
            ),
            "freeze": "trunk: train only the new final layer; none: train every layer",
            "image_size": "model input size in pixels",
            "val_fraction": "held out per class when ROOT has no train/ + val/ folders",
            "seed": "seed of the split, the new layer's weights and the shuffling",
        },
        "optimisation": {
            "epochs": "passes over the training images",
            "batch_size": "images per worker per step; the global batch is workers x this",
            "optimizer": "optimisation algorithm",
            "lr": "learning rate",
            "momentum": "SGD momentum",
            "weight_decay": "L2 penalty",
            "augment": (
                "no random crops and flips on the training split; with the trunk frozen, its "
                "outputs then never change, so they are computed once and every epoch trains the "
                "head on them (several times faster; see --no-cache-features)"
            ),
            "cache_features": (
                "run the frozen trunk on every image every epoch even when its outputs cannot "
                "change (the cache holds one feature vector per image in each worker's memory)"
            ),
        },
        "workers": {
            "workers": "Ray Train workers",
            "cpus_per_worker": (
                "CPUs per worker, also its torch threads on CPU (default: 1; with --gpu, a GPU "
                "node's CPUs per GPU, so that decoding gets every core the GPUs leave)"
            ),
            "placement": (
                "how Ray places the workers: PACK fills nodes first (fast collectives), SPREAD "
                "across nodes (survives a node loss with fewer restarts), STRICT_* insist"
            ),
            "loader_workers": (
                "DataLoader processes decoding for each worker (default: with --gpu, "
                "--cpus-per-worker - 1; on CPU 0, as the model is the bottleneck there)"
            ),
            "progress_every": "seconds between progress lines (step, images/s) within an epoch",
        },
        "run storage and recovery": {
            "storage": "Ray Train run storage, local or s3:// (default ~/ray_results)",
            "name": "run name under --storage (default: insect-train-<time>)",
            "resume": "continue the stopped run --name in --storage from its latest checkpoint",
            "max_failures": (
                "worker failures survived by restarting from the latest checkpoint (-1: no limit)"
            ),
            "keep_checkpoints": "checkpoints kept in the run storage (0: all)",
        },
    }
    | LIMITS
    | RAY
    | S3
)

CLASSIFY: Groups = (
    {
        "input and output": {
            "input": "directory, glob or s3:// prefix of images",
            "manifest": (
                "instead of INPUT, a list of the inputs (local or s3://): a text file (.txt, .lst: "
                "one absolute path or s3:// URI a line), a CSV or Parquet file with a 'path' "
                "column, or an S3 Inventory report's manifest.json (CSV, ORC or Parquet); every "
                "line gets a row, those that do not exist an error row"
            ),
            "model": "model directory written by insect train",
            "output": "directory or s3:// prefix for Parquet files",
            "rows_per_file": (
                "rows per Parquet file, at least (the last may hold fewer); files are written as "
                "they fill, and --resume redoes only rows that are not in a file yet"
            ),
            "resume": (
                "finish an interrupted run: classify only the inputs without a row in --output"
            ),
            "max_error_fraction": (
                "exit non-zero (after writing every row) when more than this fraction of the "
                "inputs cannot be classified"
            ),
        },
        "what each row holds": {
            "calibration": (
                "probabilities from the raw softmax, not divided by the temperature that "
                "training fitted on the validation split (meta.json 'temperature')"
            ),
            "top_k": "add top_labels and top_scores: the K most probable classes, best first",
            "embeddings": (
                "add 'embedding': the classifier head's input (4096 float16 values for VGG-16), "
                "for near-duplicate search and clustering"
            ),
            "min_score": (
                "rows whose top probability is below this are not decided: decided=false, "
                "label and label_index null, probabilities kept"
            ),
        },
        "model actors": {
            **ACTORS["model actors"],
            "min_actors": (
                "model actors, at least: the pool grows from here when busy (default: "
                "--max-actors, a full pool from the start)"
            ),
            "compile": (
                "torch.compile the model in each actor (bf16: 1.6x eager on Sapphire Rapids, "
                "1.1x on Zen 4; seconds to a minute of compiling); auto: on from 1000 images "
                "per actor"
            ),
        },
    }
    | LIMITS
    | without(RAY, "precision")
    | S3
)

EVALUATE: Groups = (
    {
        "input and output": {
            "data": "labelled root, local or s3://",
            "model": "model directory written by insect train",
            "output": "directory or s3:// prefix",
        },
    }
    | ACTORS
    | LIMITS
    | without(RAY, "precision")
    | S3
)

VISUALIZE: Groups = {
    "input and output": {
        "image": "image file, local or s3://",
        "model": "model directory written by insect train",
        "layers": "comma-separated layer numbers, e.g. 5,30 (see above)",
        "output": "directory or s3:// prefix",
        "max_maps": "channels drawn per layer",
    },
} | S3

SUMMARY: Groups = {
    "output": {"predictions": "the --output of insect classify (a directory or s3:// prefix)"},
} | S3

DEMO: Groups = {
    "demo": {
        "workdir": "where the demo writes everything",
        "image_size": "model input size in pixels",
    },
}

COMMANDS = {
    "train": (
        config.TrainConfig,
        TRAIN,
        "fine-tune a torchvision model on a labelled folder tree",
        "Fine-tune on ROOT/<class>/<images> (or ROOT/train + ROOT/val|test), local or s3://, "
        "with Ray Train data-parallel workers.",
    ),
    "classify": (
        config.ClassifyConfig,
        CLASSIFY,
        "classify images into Parquet with Ray Data",
        "Classify every image under INPUT (a directory, a glob or an s3:// prefix) or listed "
        "in --manifest, and write one Parquet row per file to --output. The input is listed "
        "while it is classified: folders and prefixes a level or two down are listed in "
        "parallel Ray tasks.",
    ),
    "evaluate": (
        config.EvaluateConfig,
        EVALUATE,
        "accuracy, per-class precision/recall/F1 and confusion matrix on a labelled tree",
        "Classify the labelled images of DATA (ROOT/<class>/*; with ROOT/train + "
        "ROOT/val|test, the held-out folder only) with the classification pipeline and write "
        "metrics.json, confusion_matrix.{json,png}, misclassified.parquet and the predictions "
        "to --output.",
    ),
    "visualize": (
        config.VisualizeConfig,
        VISUALIZE,
        "feature maps of chosen layers for one image, as PNG grids",
        "Run one image through the model and draw the activations of the chosen layers, one "
        "PNG grid per layer. Layers are numbered as the model's leaf modules in definition "
        "order (containers such as Sequential do not count): for VGG-16, 0-30 are the indices "
        "of model.features (conv, ReLU, max-pool), 31 the average pool, 32-38 the classifier. "
        "Asking for a layer that does not exist lists them all.",
    ),
    "summary": (
        config.SummaryConfig,
        SUMMARY,
        "what a classification output holds: rows per class, scores, errors, speed",
        "Print the summary of a classification output: its _summary.json, or for an output "
        "without one (written by an older insect, or interrupted) a summary computed from "
        "its Parquet files.",
    ),
    "demo": (
        config.DemoConfig,
        DEMO,
        "generate a sample set, train, classify, show the results",
        "The whole product on generated images, with no network.",
    ),
}


def _value_type(hint) -> type:
    """int for `int` or `int | None`, and so on."""
    if isinstance(hint, types.UnionType):
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def add_setting(group, cls: type, name: str, help: str) -> None:
    """The argument of field `name` of config class `cls`: its flag, type, default and
    choices from the field, `help` from the caller (and EXTRA's keywords for it)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    kwargs = dict(EXTRA.get(name, {}))
    hint = _value_type(typing.get_type_hints(cls)[name])
    if hint is bool:
        flag = flag_of(f)
        action = "store_false" if f.default else "store_true"
        # No default here: an absent flag leaves the field's own (and no "(default: True)"
        # beside --no-augment in --help).
        group.add_argument(flag, dest=name, action=action, default=argparse.SUPPRESS, help=help)
        return
    kwargs.setdefault("type", hint)
    if "choices" in f.metadata:
        kwargs["choices"] = f.metadata["choices"]
    if f.default is not dataclasses.MISSING:
        kwargs["default"] = f.default
    if name in POSITIONAL:
        group.add_argument(name, help=help, **kwargs)
    else:
        required = f.default is dataclasses.MISSING
        group.add_argument(flag_of(f), dest=name, required=required, help=help, **kwargs)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of field `f`: a bool that defaults to true is turned off."""
    if f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return config.flag_name(f)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default, except where there is none to show (None, a required flag)."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="insect", description="Fine-tune and run image classifiers on Ray."
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for command, (cls, groups, summary, description) in COMMANDS.items():
        p = sub.add_parser(
            command,
            help=summary,
            description=description,
            formatter_class=HelpFormatter,
        )
        for title, entries in groups.items():
            group = p.add_argument_group(title)
            for name, help in entries.items():
                owner = S3Options if name in S3Options.__dataclass_fields__ else cls
                add_setting(group, owner, name, help)
    return ap


def config_from(cls: type, args: argparse.Namespace):
    """The `cls` config from the parsed flags of its fields (and of S3Options for `s3`)."""
    values = vars(args)
    options = {k: values[k] for k in cls.__dataclass_fields__ if k in values}
    if "s3" in cls.__dataclass_fields__:
        options["s3"] = config_from(S3Options, args)
    return cls(**options)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = config_from(COMMANDS[args.command][0], args)
    try:
        if args.command == "train":
            from insectlib.train import fit

            run_as_driver(fit, cfg)
        elif args.command == "classify":
            from insectlib.classify import classify, print_summary

            print_summary(run_as_driver(classify, cfg))
        elif args.command == "evaluate":
            from insectlib.evaluate import evaluate, print_metrics

            print_metrics(run_as_driver(evaluate, cfg), cfg.output)
        elif args.command == "visualize":
            from insectlib.visualize import visualize

            for uri in visualize(cfg):
                print(uri)
        elif args.command == "summary":
            from insectlib.summary import show

            print(show(cfg))
        elif args.command == "demo":
            from insectlib.demo import run_demo

            run_demo(cfg)
    except InsectError as e:
        print(f"insect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("insect: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
