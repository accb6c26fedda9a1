"""The shape of the model-actor pool: how many actors, and how many torch threads (CPUs)
each, chosen for the CPU, precision and input at hand by a rule the benchmark validates on
every CPU that comes up (`bench/shapes.py`, docs/performance.md), and whether the model is
compiled for a run of this size. `--max-actors` and `--cpus-per-actor` override the rule.

The rule, from the shapes measured (3 rounds each where the text says so): fp32 on a CPU
with AVX-512 gets actors of several threads, one copy of the weights for them (on Zen 4, in
3 rounds, one actor of 2 threads classified 14% faster than 2 of one thread, the medians; on
Sapphire Rapids, in one run, 5% faster); everything else gets one thread per actor, so that
each core works on its own batch and one actor's decoding overlaps another's model (in
every run of 3 rounds, one actor of 2 threads had the lower median: bf16 on Zen 4, bf16
and int8 on Sapphire Rapids, int8 on Zen 4; fp32 on Zen 3, AVX2 only, ran even; bf16 on Zen 4
is within the noise, a single eager round having had one actor of 2 threads 4% ahead). bf16, and
int8 on AMX tiles, had had actors of several threads, from single runs made before a pool
of several actors got 2 tasks in flight each. An input of fewer batches than CPUs on one
node shares the node's free CPUs out over its actors as threads, up to MOST_THREADS each
(one batch on 2 CPUs runs on both).
Decoding stays fused into each actor either way (on the actor's threads, nothing copied
between processes; decoding beside an actor's model on the same cores measured no faster
on the CPU tried: docs/performance.md, "Decoding beside the model"). A test holds the rule
to the shapes measured on each CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from insectlib.config import ClassifyConfig
from insectlib.model.precision import cpu_flags
from insectlib.runtime import console

# Threads per actor where the rule gives it several, or a small input's actors share out the
# CPUs, at most: beyond it, a batch of 32 does not keep more threads busy.
MOST_THREADS = 4
# The precisions whose actors get several threads (one copy of the weights for them), and the
# CPU flag it takes (see the module's docstring).
SHARED_WEIGHTS = {"fp32": "avx512f"}
# The units that run a precision's arithmetic on its own (compiling gains most there).
FAST_UNITS = {"bf16": frozenset({"avx512_bf16", "amx_bf16"}), "int8": frozenset({"amx_int8"})}


@dataclass(frozen=True)
class ActorShape:
    """What the pool of a run looks like, and why (said in one line, kept in the summary)."""

    actors: int
    cpus_per_actor: float  # also the actor's torch threads on CPU
    compile: bool
    why: str
    # Tasks (of a block or a few) each actor is given at a time, set for the input
    # (`dataset.tasks_in_flight`); None: Ray's default.
    tasks_in_flight: int | None = 1

    def line(self) -> str:
        compiled = ", compiled" if self.compile else ""
        each = f"{console.counted(self.cpus_per_actor, 'CPU')} each"
        return f"{console.counted(self.actors, 'model actor')}, {each}{compiled} ({self.why})"

    def record(self) -> dict:
        return asdict(self)


def fast_arithmetic(precision: str, flags: frozenset[str] | None = None) -> bool:
    """Whether `precision` (the resolved one: fp32, bf16, int8) runs on units of its own
    here (`FAST_UNITS`): bf16 on bf16 units, int8 on AMX tiles."""
    flags = cpu_flags() if flags is None else flags
    return bool(FAST_UNITS.get(precision, frozenset()) & flags)


@dataclass(frozen=True)
class Cluster:
    """What the shape is chosen for: the cluster's CPUs and GPUs, the whole CPUs of each
    node with any (an actor's threads must fit on one node), and the CPUs free now."""

    cpus: float
    gpus: float
    node_cpus: tuple[int, ...]
    free_cpus: float | None = None  # None: every CPU

    def holds(self, threads: int) -> int:
        """How many actors of `threads` CPUs each the nodes hold."""
        return sum(cpus // threads for cpus in self.node_cpus)

    @property
    def one_node(self) -> bool:
        """Whether every CPU is on one node: only such a node's free CPUs are shared out."""
        return len(self.node_cpus) == 1 and self.cpus == self.node_cpus[0]


def choose(
    cfg: ClassifyConfig,
    precision: str,
    cluster: Cluster,
    seen: int,
    flags: frozenset[str] | None = None,
) -> ActorShape:
    """The shape of a run of `seen` inputs (counted as far as a choice needs) in the resolved
    `precision` (fp32, bf16, fp16, int8) on `cluster`."""
    if cfg.gpu:
        actors = min(cfg.max_actors or max(1, int(cluster.gpus)), _batches(cfg, seen))
        compile = compiles(cfg, precision, seen, GPU_COMPILE_FROM * actors)
        why = "one actor per GPU"
        return ActorShape(actors, cfg.cpus_per_actor or 1.0, compile, why, tasks_in_flight=None)
    if cfg.cpus_per_actor is not None:
        cpus, why = cfg.cpus_per_actor, "--cpus-per-actor"
        actors = min(cfg.max_actors or max(1, int(cluster.cpus // cpus)), _batches(cfg, seen))
    else:
        cpus, actors, why = cpu_shape(cfg, precision, cluster, seen, flags)
    if cfg.max_actors:
        why += ", --max-actors"
    per_actor = COMPILE_FROM[compile_kind(precision, flags)]
    threshold = None if per_actor is None else per_actor * actors
    return ActorShape(actors, cpus, compiles(cfg, precision, seen, threshold), why)


def cpu_shape(
    cfg: ClassifyConfig,
    precision: str,
    cluster: Cluster,
    seen: int,
    flags: frozenset[str] | None = None,
) -> tuple[float, int, str]:
    """(threads per actor, actors, why) by the rule (see the module's docstring)."""
    base = threads_per_actor(precision, min(cluster.node_cpus, default=1), flags)
    room = max(1, cluster.holds(base))
    actors = min(cfg.max_actors or room, _batches(cfg, seen))
    shared = shared_threads(cluster, actors) if not cfg.max_actors and actors < room else 0
    if shared > base:
        why = f"{precision}: fewer batches than CPUs, their actors share them as threads"
        return float(shared), actors, why
    if base > 1:
        return float(base), actors, f"{precision} on this CPU: threads share the weights"
    return 1.0, actors, f"{precision}: one thread per actor, a batch per core"


def threads_per_actor(precision: str, node_cpus: int, flags: frozenset[str] | None = None) -> int:
    """The rule's threads (see the module's docstring) for nodes of at least `node_cpus`
    CPUs, before a small input shares out the CPUs."""
    flags = cpu_flags() if flags is None else flags
    if SHARED_WEIGHTS.get(precision) in flags:
        return max(1, min(MOST_THREADS, node_cpus))
    return 1


def shared_threads(cluster: Cluster, actors: int) -> int:
    """Threads each (up to MOST_THREADS) for `actors` actors sharing out the CPUs free now,
    on a cluster of one node with CPUs only: on several, an actor restarted after a node is
    lost must still fit on the others, and which node's CPUs are free is not known here."""
    if not cluster.one_node:
        return 0
    free = cluster.cpus if cluster.free_cpus is None else cluster.free_cpus
    return min(MOST_THREADS, cluster.node_cpus[0], int(free) // actors)


def _batches(cfg: ClassifyConfig, seen: int) -> int:
    """Batches of `seen` inputs: no more actors than that, one would idle after loading the
    model for nothing."""
    return max(1, -(-seen // cfg.batch_size))


# Images per CPU actor from which compiling repays its start-up in the rule's shape (None:
# it gained less than the bench's noise), by `compile_kind` (measured: docs/performance.md,
# "Actor shapes"; a test holds these to the results).
COMPILE_FROM = {
    "fast arithmetic, AMX": 470,  # Sapphire Rapids, bf16 (int8 always compiles)
    "fast arithmetic": None,  # Zen 4, bf16: a one-thread actor gained 3-7%
    "compute-bound": 640,  # Zen 3, fp32
    "compute-bound, AVX-512": 930,  # Zen 4 and Sapphire Rapids, fp32 (actors of 2 threads)
}
GPU_COMPILE_FROM = 1000  # images per GPU actor: not measured apart, as CPUs were at first


def compile_kind(precision: str, flags: frozenset[str] | None = None) -> str:
    """How this CPU runs `precision`, as far as compiling gains: fast arithmetic on AMX
    tiles or vector units, or compute-bound with or without AVX-512 (where oneDNN's own
    kernels left inductor nothing to gain)."""
    flags = cpu_flags() if flags is None else flags
    if fast_arithmetic(precision, flags):
        return "fast arithmetic, AMX" if "amx_bf16" in flags else "fast arithmetic"
    return "compute-bound, AVX-512" if "avx512f" in flags else "compute-bound"


def compiles(cfg: ClassifyConfig, precision: str, seen: int, threshold: int | None) -> bool:
    """Whether the actors compile the model: --compile on, or auto from `threshold` inputs
    (None: never), where the measured gain repays the compile (int8 always compiles)."""
    if precision == "int8" or cfg.compile == "on":
        return True
    if cfg.compile == "off" or threshold is None:
        return False
    return seen >= threshold
