"""What insect writes where: every file name of a model directory, an evaluation, a
classification output and a training run, written once. (`storage.write_file` writes them.)
"""

from __future__ import annotations

# The model directory (`insect train --output`), in the order `train.write_model_dir`
# writes it. META_FILE marks it complete: an old one is removed before anything else and
# the new one written last, so a crash in between leaves no directory that looks complete
# (old classes and model id beside new weights). Readers need only META_FILE and
# WEIGHTS_FILE; the rest is for people.
METRICS_FILE = "metrics.json"  # epochs and validation metrics
CURVES_FILE = "training_curves.png"
CONFUSION_PNG = "confusion_matrix.png"  # only when there was a validation split
RELIABILITY_PNG = "reliability.png"  # calibration before and after temperature scaling
WEIGHTS_FILE = "model.safetensors"  # its SHA-256 is the model id
REPORT_FILE = "report.md"  # shows CURVES_FILE and CONFUSION_PNG
META_FILE = "meta.json"
MODEL_FILES = (
    METRICS_FILE,
    CURVES_FILE,
    CONFUSION_PNG,
    RELIABILITY_PNG,
    WEIGHTS_FILE,
    REPORT_FILE,
    META_FILE,
)
COMPLETE_MARKER = MODEL_FILES[-1]
# Derived later by `classify --precision int8` (see `int8`), in this order: the calibration
# statistics, then the record naming their hash, the model id and the measured agreement.
INT8_STATS = "int8.safetensors"
INT8_RECORD = "int8.json"
INT8_FILES = (INT8_STATS, INT8_RECORD)

# An evaluation (`insect evaluate --output`): the classification output of the held-out
# images in PREDICTIONS_DIR, then these files, which `--overwrite` may replace.
PREDICTIONS_DIR = "predictions"
CONFUSION_JSON = "confusion_matrix.json"
MISCLASSIFIED_FILE = "misclassified.parquet"
COVERAGE_PNG = "coverage_accuracy.png"  # accuracy of the images kept at each --min-score
EVALUATION_FILES = (
    METRICS_FILE,
    CONFUSION_JSON,
    CONFUSION_PNG,
    RELIABILITY_PNG,
    COVERAGE_PNG,
    MISCLASSIFIED_FILE,
)

# A classification output (`insect classify --output`): Parquet parts (named by
# `classify.outputs.PART_NAME`), then, once every input has exactly one row, these.
# Names with a leading "_": pyarrow's, Spark's and Hadoop's dataset readers skip them, so
# reading the folder as a dataset finds only the parts.
SUCCESS_FILE = "_SUCCESS"  # JSON manifest of the complete run
SUMMARY_JSON = "_summary.json"  # rows per class, scores, errors by kind, speed
SUMMARY_PNG = "_summary.png"
RUN_FILES = (SUCCESS_FILE, SUMMARY_JSON, SUMMARY_PNG)

# In any output a run writes to (a classification, an evaluation, a model directory),
# while the run holds it: the lock naming its holder (see `storage.locations`).
LOCK_FILE = "_insect.lock"
# A local file being written, beside its final name until it is whole (see
# `storage.write_bytes`); one a killed writer left is bookkeeping too.
WRITING_PREFIX = "_insect.writing."
# The log of a command run from the CLI, in its output when that is local: Ray's and
# torch's own messages (see `runtime.console`).
LOG_DIR = "_logs"

# The Parquet schema metadata key of a classification output's parts: the run's
# `predict.RowFormat` as JSON (temperature and optional columns), which --resume compares.
ROW_FORMAT_KEY = "insect.rows"

# A training run in Ray Train's run storage (`--storage`/`--name`).
RUN_RECORD = "insect-run.json"  # beside the checkpoints: what `--resume` must find unchanged
STATE_FILE = "state.pt"  # in each checkpoint: trainable weights, optimizer, history
PROBLEM_FILE = "problem.txt"  # instead of STATE_FILE: the run stopped on this problem


# --- The review page (`insect report OUT --html DIR`, issue 28) -------------------------------
# The page and what it loads, all in DIR: `--overwrite` removes these and the thumbnails
# (files named by THUMB_NAME in THUMBS_DIR), nothing else. REVIEW_PAGE is written last.
REVIEW_SCRIPT = "review.js"  # the page's only script: the CSP allows no inline one
REVIEW_STYLE = "review.css"
REVIEW_PAGE = "index.html"
REVIEW_FILES = (REVIEW_SCRIPT, REVIEW_STYLE, REVIEW_PAGE)
THUMBS_DIR = "thumbs"  # small re-encoded JPEGs, named by a hash of the input's path
THUMB_NAME = r"[0-9a-f]{32}\.jpg"

# Every name an insect command writes into its output (Parquet parts aside): what another
# command finds there is insect's, if not its own.
OUTPUT_NAMES = frozenset(
    {*MODEL_FILES, *INT8_FILES, *EVALUATION_FILES, PREDICTIONS_DIR, *RUN_FILES}
    | {*REVIEW_FILES, THUMBS_DIR}
)
