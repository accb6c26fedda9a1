"""The `insect` command: a thin argparse layer over the library."""

from __future__ import annotations

import argparse
import sys

from insectlib import storage
from insectlib.errors import InsectError
from insectlib.runtime import run


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        help="Ray cluster to use: auto, HOST:PORT or ray://HOST:PORT "
        "(default: $RAY_ADDRESS, as set by `ray job submit`, else a new local Ray)",
    )
    p.add_argument(
        "--s3-endpoint",
        help="S3-compatible endpoint URL (MinIO, Ceph, ...); default $AWS_ENDPOINT_URL",
    )
    p.add_argument("--anonymous", action="store_true", help="unsigned S3 requests (public buckets)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="compute precision; auto: bf16 where the hardware runs it fast",
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per training worker / model actor")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _add_limits(p: argparse.ArgumentParser) -> None:
    from insectlib.images import MAX_FILE_BYTES, MAX_PIXELS

    p.add_argument(
        "--max-file-bytes",
        type=int,
        default=MAX_FILE_BYTES,
        help="input files larger than this are not read (an error row; skipped in training)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_PIXELS,
        help="images with more pixels are not decoded (an error row; skipped in training); "
        "JPEGs count at the reduced scale they are decoded at",
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="insect", description="Fine-tune and run image classifiers on Ray."
    )
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="fine-tune a torchvision model on a labelled folder tree",
        description="Fine-tune on ROOT/<class>/<images> (or ROOT/train + ROOT/val|test), "
        "local or s3://, with Ray Train data-parallel workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("data", help="labelled root: ROOT/<class>/* or ROOT/{train,val}/<class>/*")
    t.add_argument("--output", default="insect-model", help="model directory to write (or s3://)")
    t.add_argument("--arch", default="vgg16", help="torchvision classification model")
    t.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (IMAGENET1K_V1 via the torch hub cache), random, or a "
        "state-dict file (.pth/.pt loaded weights_only, or .safetensors), local or s3://",
    )
    t.add_argument(
        "--freeze",
        default="trunk",
        choices=("trunk", "none"),
        help="trunk: train only the new final layer; none: train every layer",
    )
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per worker per step; the global batch is workers x this",
    )
    t.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    t.add_argument("--lr", type=float, default=0.001, help="learning rate")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="held out per class when ROOT has no train/ + val/ folders",
    )
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=224, help="model input size in pixels")
    t.add_argument(
        "--no-augment",
        dest="augment",
        action="store_false",
        help="no random crops and flips on the training split; with the trunk frozen, "
        "its outputs then never change, so they are computed once and every epoch trains "
        "the head on them (several times faster; see --no-cache-features)",
    )
    t.add_argument(
        "--no-cache-features",
        dest="cache_features",
        action="store_false",
        help="run the frozen trunk on every image every epoch even when its outputs cannot "
        "change (the cache holds one feature vector per image in each worker's memory)",
    )
    t.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    t.add_argument("--cpus-per-worker", type=float, default=1.0)
    t.add_argument(
        "--placement",
        default="PACK",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="how Ray places the workers: PACK fills nodes first (fast collectives), SPREAD "
        "across nodes (survives a node loss with fewer restarts), STRICT_* insist",
    )
    t.add_argument(
        "--loader-workers", type=int, default=0, help="DataLoader processes per training worker"
    )
    t.add_argument(
        "--storage", help="Ray Train run storage, local or s3:// (default ~/ray_results)"
    )
    t.add_argument("--name", help="run name under --storage (default: insect-train-<time>)")
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue the stopped run --name in --storage from its latest checkpoint",
    )
    t.add_argument(
        "--progress-every",
        type=float,
        default=10.0,
        help="seconds between progress lines (step, images/s) within an epoch",
    )
    t.add_argument(
        "--max-failures",
        type=int,
        default=2,
        help="worker failures survived by restarting from the latest checkpoint (-1: no limit)",
    )
    _add_limits(t)
    t.add_argument(
        "--keep-checkpoints",
        type=int,
        default=2,
        help="checkpoints kept in the run storage (0: all)",
    )
    _add_common(t)

    c = sub.add_parser(
        "classify",
        help="classify images into Parquet with Ray Data",
        description="Classify every image under INPUT (a directory, a glob or an s3:// prefix) "
        "or listed in --manifest, and write one Parquet row per file to --output. The "
        "input is listed while it is classified: folders and prefixes a level or two down "
        "are listed in parallel Ray tasks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    c.add_argument("input", nargs="?", default="", help="directory, glob or s3:// prefix of images")
    c.add_argument(
        "--manifest",
        help="instead of INPUT, a list of the inputs (local or s3://): a text file (.txt, "
        ".lst: one absolute path or s3:// URI a line), a CSV or Parquet file with a 'path' "
        "column, or an S3 Inventory report's manifest.json (CSV, ORC or Parquet); every "
        "line gets a row, those that do not exist an error row",
    )
    c.add_argument("--model", required=True, help="model directory written by insect train")
    c.add_argument("--output", required=True, help="directory or s3:// prefix for Parquet files")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument(
        "--min-actors",
        type=int,
        help="model actors, at least: the pool grows from here when busy (default: "
        "--max-actors, a full pool from the start)",
    )
    c.add_argument(
        "--max-actors",
        type=int,
        help="model actors, at most (default: one per GPU with --gpu, else one per "
        "--cpus-per-actor CPUs of the cluster)",
    )
    c.add_argument(
        "--max-error-fraction",
        type=float,
        help="exit non-zero (after writing every row) when more than this fraction "
        "of the inputs cannot be classified",
    )
    c.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs per model actor (also its torch threads on CPU)",
    )
    c.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile the model in each actor (about 1.6x faster on CPU, after seconds "
        "to a minute of compiling); auto: on from 1000 images per actor",
    )
    c.add_argument(
        "--rows-per-file",
        type=int,
        default=1000,
        help="rows per Parquet file, at least (the last may hold fewer); files are written "
        "as they fill, and --resume redoes only rows that are not in a file yet",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="finish an interrupted run: classify only the inputs without a row in --output",
    )
    _add_limits(c)
    _add_common(c)

    e = sub.add_parser(
        "evaluate",
        help="accuracy, per-class precision/recall/F1 and confusion matrix on a labelled tree",
        description="Classify the labelled images of DATA (ROOT/<class>/*; with ROOT/train + "
        "ROOT/val|test, the held-out folder only) with the classification pipeline and write "
        "metrics.json, confusion_matrix.{json,png}, misclassified.parquet and the predictions "
        "to --output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("data", help="labelled root, local or s3://")
    e.add_argument("--model", required=True, help="model directory written by insect train")
    e.add_argument("--output", default="evaluation", help="directory or s3:// prefix")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-actors", type=int, help="model actors (default: one per CPU or GPU)")
    e.add_argument("--cpus-per-actor", type=float, default=1.0)
    _add_limits(e)
    _add_common(e)

    v = sub.add_parser(
        "visualize",
        help="feature maps of chosen layers for one image, as PNG grids",
        description="Run one image through the model and draw the activations of the chosen "
        "layers, one PNG grid per layer. Layers are numbered as the model's leaf modules in "
        "definition order (containers such as Sequential do not count): for VGG-16, 0-30 are "
        "the indices of model.features (conv, ReLU, max-pool), 31 the average pool, 32-38 the "
        "classifier. Asking for a layer that does not exist lists them all.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    v.add_argument("image", help="image file, local or s3://")
    v.add_argument("--model", required=True, help="model directory written by insect train")
    v.add_argument(
        "--layers",
        required=True,
        type=_int_list,
        help="comma-separated layer numbers, e.g. 5,30 (see above)",
    )
    v.add_argument("--output", default="feature-maps", help="directory or s3:// prefix")
    v.add_argument("--max-maps", type=int, default=64, help="channels drawn per layer")
    v.add_argument("--s3-endpoint", help="S3-compatible endpoint URL")
    v.add_argument("--anonymous", action="store_true", help="unsigned S3 requests")

    d = sub.add_parser(
        "demo",
        help="generate a sample set, train, classify, show the results",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--workdir", default="demo-output", help="where the demo writes everything")
    d.add_argument("--image-size", type=int, default=128)
    return ap


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 5,30, got {text!r}") from None


def _config(cls, args):
    """The `cls` dataclass config from the parsed flags of the same names."""
    options = {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}
    return cls(**options, s3=_s3(args))


def _s3(args) -> storage.S3Options:
    return storage.S3Options(endpoint_url=args.s3_endpoint, anonymous=args.anonymous)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train":
            from insectlib.train import TrainConfig, fit

            run(fit, _config(TrainConfig, args))
        elif args.command == "classify":
            from insectlib.classify import ClassifyConfig, classify, print_summary

            print_summary(run(classify, _config(ClassifyConfig, args)))
        elif args.command == "evaluate":
            from insectlib.evaluate import EvaluateConfig, evaluate, print_metrics

            print_metrics(run(evaluate, _config(EvaluateConfig, args)), args.output)
        elif args.command == "visualize":
            from insectlib.visualize import VisualizeConfig, visualize

            for uri in visualize(_config(VisualizeConfig, args)):
                print(uri)
        elif args.command == "demo":
            from insectlib.demo import run_demo

            run_demo(args.workdir, args.image_size)
    except InsectError as e:
        print(f"insect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("insect: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
