"""int8 classification on CPU: post-training static quantization with PyTorch 2 export
quantization (torchao's `X86InductorQuantizer`), lowered by `torch.compile` (freezing) to
oneDNN's int8 kernels (VNNI/AMX where the CPU has them, AVX2 elsewhere).

Why this library: it is PyTorch's own quantization path, and it runs the model insect
already compiles for `--compile` (no second runtime, no ONNX export of each arch); what it
gains per CPU is in docs/performance.md. Archs that torchao 0.18 cannot quantize with torch
2.14 (the ResNets: "Input partition has more than one output node") are refused with one
line.

The int8 statistics (the activation observers' state: histograms and ranges, a few hundred
kB for VGG-16) are measured once (`int8_statistics`) and kept beside the model as
safetensors, with a record of how they were made and how well the int8 model agrees with
fp32 (`layout.INT8_FILES`). This module rebuilds the quantized model from the fp32 weights
and those statistics wherever it runs (export, prepare, load, observe the weights, convert,
fold the weights to int8, compile): nothing but tensors and JSON is ever read back, so no
code runs from a model directory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import torch

from insectlib import layout, storage
from insectlib.config import INT8_AGREEMENT_MIN
from insectlib.errors import InsectError
from insectlib.model.meta import ModelMeta, versions
from insectlib.model.precision import quiet_compile_chatter
from insectlib.runtime import console

FOLD_BLOCK = 1 << 20  # values quantized at once when folding a weight (`_quantize_in_blocks`)
# The graph the statistics belong to. 2: the model returning (logits, embedding)
# (`model.WithEmbedding`); records without it (1) were made on the logits-only graph and
# count as absent: measure them again.
INT8_FORMAT = 2


def int8_id_prefix(model_id: str) -> str:
    """How the ids of the int8 forms of model `model_id` begin (one per set of statistics)."""
    return f"{model_id}-int8-"


@dataclass
class Int8Record:
    """`layout.INT8_RECORD`: how the statistics were made and what they give."""

    model_id: str  # the fp32 model the statistics belong to
    stats_sha256: str  # of `layout.INT8_STATS`
    images_from: str  # where the images the statistics were measured on came from
    fit_images: int
    agreement_images: int
    top1_agreement: float  # fraction of held-out images with the fp32 model's top-1
    max_probability_difference: float
    cpu: str
    versions: dict = field(default_factory=dict)
    format_version: int = 1  # INT8_FORMAT when made; 1 for records written before it

    @property
    def int8_model_id(self) -> str:
        """The id in the `model` column of the rows this int8 model classifies."""
        return int8_id_prefix(self.model_id) + self.stats_sha256[:12]

    def validate(self) -> None:
        numbers = ("top1_agreement", "max_probability_difference")
        if (
            not all(isinstance(getattr(self, k), (int, float)) for k in numbers)
            or not all(
                isinstance(getattr(self, k), str)
                for k in ("model_id", "stats_sha256", "images_from")
            )
            or not isinstance(self.format_version, int)
            or not isinstance(self.versions, dict)
        ):
            raise ValueError("a field has the wrong type")

    @property
    def trusted(self) -> bool:
        return self.top1_agreement >= INT8_AGREEMENT_MIN


@dataclass
class Int8Model:
    """What a run needs to rebuild the int8 model: the statistics and their record."""

    stats: dict[str, torch.Tensor]
    record: Int8Record


def prepare(model: torch.nn.Module, image_size: int, batch_size: int):
    """`model` exported (batch size dynamic) with the x86 quantizer's observers inserted."""
    quiet_compile_chatter()  # before torchao's first import
    from torch.export import Dim, export
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    example = torch.zeros(batch_size, 3, image_size, image_size)
    batch = Dim("batch", min=1, max=max(batch_size, 1024))
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    try:
        graph = export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
        return prepare_pt2e(graph, quantizer)
    except Exception as e:  # torchao raises plain errors for patterns it cannot quantize
        raise InsectError(
            f"int8 quantization does not support this model ({type(e).__name__}: {e}); "
            "use --precision bf16 or fp32"
        ) from None


def _observers(prepared) -> tuple[list[str], list[tuple[str, str]]]:
    """Names of the activation observers, and (observer, weight attribute) pairs of the
    weight observers: those whose input is a constant of the graph."""
    activations, weights = [], []
    for node in prepared.graph.nodes:
        if node.op != "call_module" or "activation_post_process" not in node.target:
            continue
        source = node.args[0]
        if getattr(source, "op", None) == "get_attr":
            weights.append((node.target, source.target))
        else:
            activations.append(node.target)
    return activations, weights


def activation_stats(prepared) -> dict[str, torch.Tensor]:
    """The int8 statistics of a prepared model: its activation observers' state.
    The weight observers' state is left out: it follows from the weights."""
    activations, _ = _observers(prepared)
    stats = {}
    for name in activations:
        for key, value in prepared.get_submodule(name).state_dict().items():
            stats[f"{name}.{key}"] = value.detach().clone()
    return stats


def quantize(
    model: torch.nn.Module, stats: dict[str, torch.Tensor], image_size: int, batch_size: int
):
    """The int8 model (a converted PT2E graph with int8 weights, eager; compile it to run
    int8 kernels) of the fp32 `model` with the activation statistics `stats`."""
    try:
        return _fold_weight_quantize(_converted(model, stats, image_size, batch_size))
    finally:
        forget_graphs()  # where it fails too: they hold the fp32 weights


def _converted(
    model: torch.nn.Module, stats: dict[str, torch.Tensor], image_size: int, batch_size: int
) -> torch.fx.GraphModule:
    """`convert_pt2e`'s graph of `model` with the statistics `stats`, weights still fp32."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    prepared = prepare(model, image_size, batch_size)
    expected = activation_stats(prepared)
    if set(stats) != set(expected) or any(stats[k].shape != expected[k].shape for k in expected):
        raise InsectError("the int8 statistics do not fit this model: measure them again")
    prepared.load_state_dict(stats, strict=False)
    _, weights = _observers(prepared)
    with torch.no_grad():
        for observer, attribute in weights:
            prepared.get_submodule(observer)(_attribute(prepared, attribute))
    # `_fold_weight_quantize` folds the weights: torchao's own folding computes every
    # dequantized weight too, only to drop it (3.0 s of a VGG-16 actor, one core).
    return convert_pt2e(prepared, fold_quantize=False)


def forget_graphs() -> None:
    """Let go of the graphs that torchao 0.18 and torch 2.14 keep: both cache the device of
    every module quantization is given (`_assert_and_get_unique_device`,
    `assert_and_get_unique_device`) with functools, which holds the modules themselves
    (the exported and prepared graphs, with the model's fp32 weights: 506 MiB of them
    measured alive in a VGG-16 int8 actor, the whole model after measuring statistics)."""
    import torch.ao.quantization.fx.utils as torch_utils
    import torchao.utils as torchao_utils

    for cached in (
        getattr(torchao_utils, "_assert_and_get_unique_device", None),
        getattr(torch_utils, "assert_and_get_unique_device", None),
    ):
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


def _fold_weight_quantize(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`graph` with each weight's quantize op replaced by the int8 weight it computes, the
    dequantize ops of those weights given no zero points where theirs are all zero (the
    x86 quantizer's weights are symmetric; inductor's int8 lowering takes None as zero),
    and the attributes no node reads any more dropped (the fp32 weights).

    Why: inductor's freezing evaluates every weight's dequantize, twice, only to drop the
    result (it keeps q/dq to lower them to int8 kernels), and folds a weight's quantize
    there too if nothing did before. Measured on a VGG-16 actor's compile (2 threads):
    fp32 weights folded there 8.5 s; these int8 weights 6.3 s (after 0.1 s for this
    fold); with no zero points 5.3 s (the dequantize then multiplies int8 by the scales
    instead of subtracting int64 zero points first). Identical outputs, the same
    qconv/qlinear lowering and speed."""
    quantize = torch.ops.quantized_decomposed.quantize_per_channel.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_channel.default
    for node in graph.graph.find_nodes(op="call_function", target=quantize):
        maybe_unused = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if any(a.op != "get_attr" for a in maybe_unused):
            continue  # not a constant: an activation, or a weight behind a view
        weight, scales, zero_points, axis, *limits = (
            _attribute(graph, a.target) if isinstance(a, torch.fx.Node) else a for a in node.args
        )
        name = _new_attribute_name(graph, "_int8_weight")
        graph.register_buffer(name, _quantize_in_blocks(weight, scales, zero_points, axis, *limits))
        with graph.graph.inserting_before(node):
            folded = graph.graph.get_attr(name)
        node.replace_all_uses_with(folded)
        graph.graph.erase_node(node)
        for user in list(folded.users):
            zero = user.args[2] if user.target is dequantize else None
            if getattr(zero, "op", None) == "get_attr" and not _attribute(graph, zero.target).any():
                user.update_arg(2, None)
                maybe_unused.append(zero)
        for unused in {a for a in maybe_unused if not a.users}:
            graph.graph.erase_node(unused)
            if not graph.graph.find_nodes(op="get_attr", target=unused.target):
                _drop_attribute(graph, unused.target)
    graph.recompile()
    return graph


def _quantize_in_blocks(
    weight: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`quantize_per_channel` of `weight` in blocks of channels (FOLD_BLOCK values): the
    op's five steps each allocate a temporary as large as the weight, and VGG-16's took
    0.74 s whole against 0.10 s in these blocks (2 threads, identical int8 weights)."""
    quantize = torch.ops.quantized_decomposed.quantize_per_channel.default
    rows = max(1, FOLD_BLOCK * weight.shape[axis] // weight.numel())
    blocks = zip(weight.split(rows, axis), scales.split(rows), zero_points.split(rows), strict=True)
    with torch.no_grad():
        return torch.cat(
            [quantize(w, s, z, axis, quant_min, quant_max, dtype) for w, s, z in blocks], axis
        )


def _new_attribute_name(module: torch.nn.Module, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in itertools.count() if not hasattr(module, f"{prefix}{i}"))


def inductor_settings() -> dict:
    """The inductor settings that lower a converted graph to int8 kernels: torchao's x86
    pre-grad pass, which its quantizer installs only in the thread that imports it."""
    from torchao.quantization.pt2e.inductor_passes.x86 import quant_lift_up

    return {"pre_grad_custom_pass": quant_lift_up}


def _attribute(module: torch.nn.Module, dotted: str) -> torch.Tensor:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def _drop_attribute(module: torch.nn.Module, dotted: str) -> None:
    owner, _, name = dotted.rpartition(".")
    delattr(module.get_submodule(owner) if owner else module, name)


def load(model_uri: str, meta: ModelMeta, s3=None) -> Int8Model | None:
    """The statistics stored beside the model, when they belong to this model; None when
    there are none, or when they cannot be used: made for other weights or another graph
    form, half removed, altered (their hash is not their record's), not insect's, or left
    by two measurements in this directory at once (one's statistics beside the other's
    record, or a file read while it was written). The files are a cache: an int8 run then
    measures them again and replaces them, auto runs bf16 or fp32. Why they were not used is
    said on stderr where it is not plain."""
    record_uri = storage.join(model_uri, layout.INT8_RECORD)
    stats_uri = storage.join(model_uri, layout.INT8_STATS)
    if not storage.exists(record_uri, s3):
        return None
    try:
        record = Int8Record(**_renamed(json.loads(storage.read_bytes(record_uri, s3))))
        record.validate()
    except (ValueError, TypeError) as e:
        return _unused(f"{record_uri} is not a valid insect int8 record: {e}")
    if record.format_version != INT8_FORMAT:
        return None  # made on another form of the model's graph
    if record.model_id != meta.model_id or not storage.exists(stats_uri, s3):
        return None  # made for weights this directory no longer holds, or half removed
    made, now = _graph_versions(record.versions), _graph_versions(versions())
    if any(made[name] != now[name] for name in made):  # another graph may be exported
        return _unused(f"they were made with {_named(made)}, this is {_named(now)}")
    data = storage.read_bytes(stats_uri, s3)
    if hashlib.sha256(data).hexdigest() != record.stats_sha256:
        return _unused(f"{stats_uri} does not match {record_uri}")
    from safetensors.torch import load as load_tensors

    try:
        return Int8Model(load_tensors(data), record)
    except Exception as e:  # safetensors' own error types vary by version
        return _unused(f"{stats_uri} is not a valid safetensors file: {e}")


# Keys of records written before "calibration" meant only temperature scaling.
OLD_RECORD_KEYS = {"calibration": "images_from", "calibration_images": "fit_images"}


def _renamed(record):
    if not isinstance(record, dict):
        raise TypeError("not an object")
    return {OLD_RECORD_KEYS.get(k, k): v for k, v in record.items()}


def _graph_versions(found: dict) -> dict[str, str]:
    """The releases of the libraries that decide the exported graph and its observers,
    among `found` (a record made before torchao was recorded names torch only): local
    build tags (+cu130, +cpu) left out, as the graph does not depend on them."""
    return {name: str(found[name]).split("+")[0] for name in ("torch", "torchao") if name in found}


def _named(found: dict[str, str]) -> str:
    return ", ".join(f"{name} {version!r}" for name, version in found.items())


def _unused(why: str) -> None:
    console.warn(f"int8 statistics not used: {why} (an int8 run measures them again)")
    return None
