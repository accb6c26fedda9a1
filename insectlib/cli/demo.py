"""`insect demo`: the whole product on generated images, with no network."""

from __future__ import annotations

import os

from insectlib import storage
from insectlib.config import ClassifyConfig, DemoConfig, TrainConfig
from insectlib.errors import InsectError
from insectlib.layout import LOCK_FILE, LOG_DIR
from insectlib.runtime import console
from insectlib.storage.lock import output_lock

# What the demo writes in its --workdir: the generated images, the model, Ray Train's run
# folder, the predictions (and its log, LOG_DIR).
SAMPLE, MODEL, RUNS, PREDICTIONS = "sample", "model", "ray_results", "predictions"
LABELLED, UNLABELLED = "labelled", "unlabelled"  # the sample's two sets, in SAMPLE
PER_CLASS, UNLABELLED_IMAGES = 60, 30  # their sizes


def check_workdir(workdir: str) -> None:
    """Refuse a --workdir that holds anything but an earlier demo's folders: the demo
    writes over its own, and would add them to a labelled tree as classes. Before the
    log file goes there, and before torch is imported."""
    why = storage.folder_problem(workdir)
    if why:
        raise InsectError(f"--workdir {workdir} {why}; give a folder")
    if not os.path.isdir(workdir):
        return  # new
    ours = {SAMPLE, MODEL, RUNS, PREDICTIONS, LOG_DIR, LOCK_FILE}
    foreign = sorted(n for n in os.listdir(workdir) if n not in ours and not n.startswith("."))
    foreign = foreign or foreign_samples(os.path.join(workdir, SAMPLE))
    if foreign:
        shown = ", ".join(storage.printable(name) for name in foreign[:5])
        raise InsectError(
            f"--workdir {workdir} holds what an earlier demo did not write ({shown}"
            f"{', ...' if len(foreign) > 5 else ''}): give a new or empty folder"
        )


def foreign_samples(sample: str) -> list[str]:
    """The files in an earlier demo's `sample` folder (relative to the workdir) that the
    demo does not write: it writes its own over, and would train on or classify them too."""
    from insectlib.data import synthetic

    own = {f"{LABELLED}/{name}" for name, _ in synthetic.labelled_names(PER_CLASS)}
    own |= {f"{UNLABELLED}/{name}" for name, _ in synthetic.unlabelled_names(UNLABELLED_IMAGES)}
    found = []
    for folder, dirs, files in os.walk(sample):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(folder, sample)
        found += [os.path.normpath(os.path.join(rel, f)) for f in files if not f.startswith(".")]
    return sorted(os.path.join(SAMPLE, f) for f in found if f not in own)


def imagenet_weights_cached(arch: str) -> bool:
    """Whether torchvision's IMAGENET1K_V1 weights for `arch` are in the torch hub cache."""
    from insectlib.model.network import imagenet_weights_path

    return os.path.exists(imagenet_weights_path(arch))


def run_demo(demo: DemoConfig) -> None:
    """Generate a labelled and an unlabelled set, train 4 epochs on 2 workers, classify."""
    demo.validate()
    workdir = os.path.abspath(demo.workdir)
    check_workdir(workdir)
    # Held to the end: a second demo at once would rewrite the images this one reads.
    with output_lock(workdir, "demo", say=console.say):
        truth = make_samples(workdir)
        meta, summary = train_and_classify(demo, workdir)
    show_result(workdir, meta, summary, truth)


def make_samples(workdir: str) -> dict[str, str]:
    """Write the labelled and the unlabelled set; {unlabelled path: its generating class}."""
    from insectlib.data import synthetic

    labelled = os.path.join(workdir, SAMPLE, LABELLED)
    synthetic.make_labelled(labelled, per_class=PER_CLASS)
    truth = synthetic.make_unlabelled(os.path.join(workdir, SAMPLE, UNLABELLED), UNLABELLED_IMAGES)
    console.say(f"sample images written to {os.path.dirname(labelled)}")
    return truth


def train_and_classify(demo: DemoConfig, workdir: str):
    """Train on the labelled set and classify the unlabelled one: (ModelMeta, RunSummary)."""
    from insectlib.classify.pipeline import classify
    from insectlib.training.trainer import fit

    weights = "imagenet"
    if not imagenet_weights_cached("vgg16"):
        weights = "random"
        console.say(
            "ImageNet weights for vgg16 are not in the torch hub cache: "
            "using randomly initialised weights."
        )
    cfg = TrainConfig(
        data=os.path.join(workdir, SAMPLE, LABELLED),
        output=os.path.join(workdir, MODEL),
        weights=weights,
        image_size=demo.image_size,
        augment=False,  # 4 epochs of ~3 steps: random crops would only slow learning here
        optimizer="adam",
        lr=0.01,  # random-trunk features are small; this also suits ImageNet features
        storage=os.path.join(workdir, RUNS),
        overwrite=True,
    )
    with console.without_advice():  # insect demo has no --resume, --name
        meta = fit(cfg)
        summary = classify(
            ClassifyConfig(
                input=os.path.join(workdir, SAMPLE, UNLABELLED),
                model=cfg.output,
                output=os.path.join(workdir, PREDICTIONS),
                overwrite=True,
            )
        )
    return meta, summary


def show_result(workdir: str, meta, summary, truth: dict[str, str]) -> None:
    """The run's summary, its first rows, and how many predictions match the truth."""
    import pyarrow.dataset

    from insectlib.classify.pipeline import print_summary

    print_summary(summary)
    table = pyarrow.dataset.dataset(summary.output, format="parquet").to_table()
    rows = table.sort_by("path").to_pylist()
    console.say("\nfirst rows of the predictions:")
    for row in rows[:3]:  # a taste: the demo keeps to 25 lines, its progress lines included
        name = os.path.basename(row["path"])
        console.say(f"  {name:16} {row['label']:12} score {row['score']:.3f}")
    agree = sum(row["label"] == truth[row["path"]] for row in rows)
    console.say(f"\nunlabelled set: {agree}/{len(rows)} predictions match the generating class")
    console.say(
        f"validation accuracy: {meta.epochs[-1]['val_accuracy']:.3f} "
        f"(chance is {1 / len(meta.classes):.3f})"
    )
    model = os.path.join(workdir, MODEL)
    console.say(f"model: {model}\npredictions (Parquet): {storage.join(summary.output, '')}")
