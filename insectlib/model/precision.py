"""Mixed precision, shared by training workers and model actors: which dtype a device
computes in, and the autocast context that applies it."""

from __future__ import annotations

import contextlib
import functools
import logging
import platform
import sys
import warnings

import torch


@functools.cache
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo), empty where they cannot be read."""
    return frozenset(_cpu_flags())


def cpu_name() -> str:
    """The CPU model name, for records and benchmark results."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# The CPU features that decide what runs fast: float matmuls (AVX2, AVX-512), bf16 and int8.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx_vnni", "avx512_vnni", "amx_int8")


def speed_flags() -> list[str]:
    """Which of SPEED_FLAGS this CPU has."""
    return [f for f in SPEED_FLAGS if f in _cpu_flags()]


def _cpu_has_fast_bf16() -> bool:
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


def cpu_runs_int8_fast() -> bool:
    """Whether int8 beats the best float precision here: x86 with AVX2 at least (oneDNN's
    u8s8 kernels; VNNI and AMX run them faster still; docs/performance.md has the figures)."""
    return "avx2" in _cpu_flags()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `precision` on `device`; auto picks bf16 where it runs fast."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for the forward pass; a no-op context for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# What torch 2.14 and torchao 0.18 print in every model actor that compiles (a Ray actor's
# lines reach the user's console) and that says nothing about their run: the logger, and
# the start of the line's format string.
COMPILE_CHATTER = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",  # a CPU machine, as expected
    # a library (torchao, at import) registering an enum the way torch 2.14 deprecates
    "torch.utils._pytree": "%s is an Enum subclass and is now natively supported",
}


@functools.cache
def quiet_compile_chatter() -> None:
    """Drop COMPILE_CHATTER from this process's console (call it before torchao is first
    imported); everything else torch says stays."""
    for name, start in COMPILE_CHATTER.items():
        logging.getLogger(name).addFilter(lambda r, s=start: not str(r.msg).startswith(s))


def compile_frozen(model: torch.nn.Module, example: torch.Tensor, **settings):
    """`model` compiled for inference with freezing, as a callable; None where compiling
    fails (it needs a C++ compiler, Triton on GPU): run the model eagerly. Freezing folds
    the weights into the graph as constants, which lets inductor pre-pack them for oneDNN
    and lower int8 q/dq patterns to int8 kernels. `settings`: more inductor settings
    (int8's pass, see `int8.inductor_settings`).

    It compiles now, on `example` (the shape, dtype and tensor kind, inference or not, of
    every later input: another recompiles), and every call runs under the settings: torch
    2.14 keeps them per thread, and Ray Data calls a model actor in a thread of its own.
    Compiled lazily there, VGG-16 int8 lost freezing and torchao's pass and ran its q/dq
    ops in fp32, 12 images/s against 56 (112 px, one core); bf16 lost 7%.
    (`torch.compile(options=...)` is not enough: int8 then fails to compile.)"""
    from torch._inductor import config as inductor_config

    settings = {"freezing": True, **settings}
    compiled = torch.compile(model, dynamic=False)

    def run(x: torch.Tensor):
        with inductor_config.patch(**settings):
            return compiled(x)

    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # inductor's int8 lowering copies a tensor the way torch warns about: not the
            # user's to act on. (Scoped to this compile: a process-wide filter would be
            # dropped by any caller's own `catch_warnings`.)
            warnings.filterwarnings(
                "ignore", "To copy construct from a tensor", UserWarning, r"torch\._inductor\."
            )
            run(example)
    except Exception as e:
        print(f"torch.compile failed, running the model eagerly: {e}", file=sys.stderr)
        return None
    return run
