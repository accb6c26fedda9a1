"""Connecting to Ray, and running the driver's part of a command where it must run."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import re
import signal
import socket
import sys
import threading
import urllib.parse
import warnings
from collections.abc import Callable
from typing import TypeVar

import ray

from insectlib import storage
from insectlib.errors import InsectError, file_problem
from insectlib.runtime import console, relay

T = TypeVar("T")
GRPC_DEFAULT_PORT = 443  # gRPC's port for a host named without one
GRPC_PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy")  # what gRPC dials through
TRACEBACK = "Traceback (most recent call last):"
TRACEBACK_LINKS = (TRACEBACK, "The above exception was", "During handling of the above")
# Idle Ray worker processes a Ray of the command's own keeps for the next task, at least
# (as many as the machine has CPUs where that is more). Ray keeps as many as CPUs are free:
# none while the model actors hold them all, so a Parquet write task after a second's
# pause started a new worker process, about a second of CPU taken from the model
# (docs/performance.md, "Where the CPUs go").
IDLE_WORKERS_KEPT = 4
IDLE_WORKERS_SETTING = "num_workers_soft_limit"  # Ray's name for that number
# A Ray of the command's own is gone for good with its GCS (a SIGTERM to the command's
# process group stops Ray's processes too), where Ray waits 60 s for a cluster's to come
# back: they give up this long after, mostly after classify's own end then (docs/safety.md).
GCS_GONE_S = 20
RAY_SETTING_VARIABLE = "RAY_{}"  # the environment variable Ray reads a setting from
IDLE_WORKER_LIMIT = RAY_SETTING_VARIABLE.format(IDLE_WORKERS_SETTING)
INSECT_ERROR_LINE = re.compile(r"insectlib\.errors\.(?:InsectError|StorageUnavailable): ([^\n]+)")


def init_ray(address: str | None = None, dashboard: bool = False) -> None:
    """Connect to the cluster at `address` ("auto", "ray://host:port", "host:port").

    With no address and no $RAY_ADDRESS (which `ray job submit` sets), start a local Ray
    rather than attaching to whatever cluster happens to run on this machine; with its
    dashboard only where asked (`dashboard`: Ray Train asks its State API about the run).
    """
    if ray.is_initialized():
        return
    target, source = address_in_use(address)
    if client_address(address):  # `run_as_driver` sends such commands to the cluster
        raise InsectError(
            f"{source} {target} is a Ray Client address, through which Ray Data and Ray Train "
            f"cannot be driven from here: unset {source} or give the head's HOST:PORT"
        )
    env = os.environ.get("RAY_ADDRESS")
    if target is None:
        address = target = "local"
    check_reachable(target, source)
    console.start_log()  # Ray's own lines from here on go to the command's log
    own = own_ray_options(dashboard) if target == "local" else {}
    # Not left to exit (after the log has closed, the command's end over), even where
    # ray.init fails after its core has started.
    console.on_close(shutdown)
    with sigterm_while_ray_starts():
        try:
            ray.init(address=address, logging_level="WARNING", **own)
        except Exception as e:  # ConnectionError, AuthenticationError, ValueError, ...
            raise InsectError(connection_problem(address or env, e)) from None
        interrupt_on_sigterm()


@contextlib.contextmanager
def sigterm_while_ray_starts():
    """A SIGTERM while ray.init runs goes to Ray's handler, sys.exit, until ours replaces
    it (its call may land after ray.init has raised, after Ray's 30 s wait for a raylet
    or a client connection, gone): the command is interrupted, as by ours, not ended
    with the signal's number and no word."""
    try:
        yield
    except SystemExit:
        raise KeyboardInterrupt from None


def interrupt_on_sigterm() -> None:
    """A SIGTERM (`ray job stop`, a supervisor, `kill`) ends the command as a Ctrl-C does:
    its writes waited for, its advice said (how to --resume), exit 130. ray.init's own
    handler exited with the signal's number and no word, or (training) aborted."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_ctrl_c)


def _as_ctrl_c(signum, frame) -> None:
    """SIGTERM handed to whatever takes Ctrl-C at that moment: Ray Train's handler during a
    fit (it aborts the run through its controller), else a KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # SIG_IGN or SIG_DFL (a background job's): as Python's own
        handler = signal.default_int_handler
    handler(signal.SIGINT, frame)


def own_ray_options(dashboard: bool) -> dict:
    """ray.init's options for a Ray of the command's own (not a cluster's, which is as its
    operator started it).

    No dashboard unless asked (`dashboard`): nobody is told of it (Ray's lines go to the
    log), and it took start-up time and CPU from the run (docs/performance.md). Asked, Ray's
    default: one that fails to start is logged, not fatal. Ray's settings: those of
    `own_ray_settings`, each one the user set in its $RAY_<name> left to Ray."""
    options: dict = {} if dashboard else {"include_dashboard": False}
    settings = own_ray_settings().items()
    system = {k: v for k, v in settings if RAY_SETTING_VARIABLE.format(k) not in os.environ}
    if system:  # ray.init's way to set what Ray reads from the environment
        options["_system_config"] = system
    return options


def own_ray_settings() -> dict[str, int]:
    """Ray's settings for a Ray of the command's own: see IDLE_WORKERS_KEPT, GCS_GONE_S."""
    return {
        IDLE_WORKERS_SETTING: max(IDLE_WORKERS_KEPT, os.cpu_count() or 1),  # never below Ray's
        "gcs_rpc_server_reconnect_timeout_s": GCS_GONE_S,
    }


def shutdown() -> None:
    """Ray's end at the end of a command that connected it (its result, error or
    interruption in): a Ctrl-C meanwhile is let go (a SIGTERM is, by `console.command_log`),
    the SIGTERM handler Python holds is put back where Ray's core reset it, and the colour
    reset that Ray's colorama.init(strip=False) registers for exit, which wrote ESC[0m on the
    terminal after the last line, is dropped."""
    with contextlib.suppress(KeyboardInterrupt):
        ray.shutdown()
    handler = signal.getsignal(signal.SIGTERM)
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)  # Ray's core set SIG_DFL underneath it
    reset = getattr(getattr(sys.modules.get("colorama"), "initialise", None), "reset_all", None)
    if reset is not None:
        atexit.unregister(reset)


def check_reachable(address: str | None, source: str = "--address") -> None:
    """Fail within seconds when a HOST:PORT or ray://HOST[:PORT] address (given as `source`)
    does not answer: ray.init would retry for about 14 minutes (20 attempts of ~41 s each,
    on Ray 2.60), or 30 s through ray://."""
    if not address or address in ("auto", "local"):
        return
    if "://" in address and not address.startswith("ray://"):
        return
    if address.startswith("ray://") and client_through_proxy():
        return  # Ray Client's gRPC dials through the proxy, which a probe from here would not
    implied = ""
    try:
        if address.startswith("ray://"):
            where = urllib.parse.urlsplit(address)
            host, port = where.hostname, where.port
            if port is None:  # Ray's client hands the address to gRPC, which dials this
                port, implied = GRPC_DEFAULT_PORT, f" (port {GRPC_DEFAULT_PORT}, gRPC's default)"
        else:
            host, _, port = address.rpartition(":")
            host = host.strip("[]")  # Ray writes IPv6 hosts in brackets: [::1]:6379
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise InsectError(
            f"cannot connect to Ray at {address}{implied}: {e}; check {source} (auto, HOST:PORT or "
            "ray://HOST:10001) and that the head is running"
        ) from None


def client_through_proxy() -> bool:
    """Whether Ray Client's gRPC goes through a proxy: one is set, and Ray lets gRPC use it
    (RAY_grpc_enable_http_proxy; off by default, Ray's GRPC_ENABLE_HTTP_PROXY)."""
    if os.environ.get("RAY_grpc_enable_http_proxy", "0").lower() not in ("1", "true"):
        return False
    return any(os.environ.get(v) for v in GRPC_PROXY_VARIABLES)


def connection_problem(address: str, error: Exception) -> str:
    """One line on why connecting to the Ray cluster at `address` failed."""
    text = what_failed(error)[:300]
    chain, e = [], error
    while e is not None and len(chain) < 10:
        chain.append(f"{type(e).__name__} {what_failed(e)}".lower())
        e = e.__cause__ or e.__context__
    if any("authentication" in link or "auth_token" in link for link in chain):
        return (
            f"cannot connect to Ray at {address}: the cluster requires token authentication "
            "and this process has no valid token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            f"(or ~/.ray/auth_token) to the cluster's token ({type(error).__name__}: {text})"
        )
    if address.startswith("ray://") and "connection timeout" in text:
        # Its port answers (checked before), but a client without the cluster's token is
        # not refused: its connection times out.
        return (
            f"cannot connect to Ray at {address}: {type(error).__name__}: {text}; where the "
            "cluster uses token authentication, set RAY_AUTH_MODE=token and its token "
            "(RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        )
    return f"cannot connect to Ray at {address}: {type(error).__name__}: {text}"


def what_failed(error: BaseException) -> str:
    """`error`'s text on one line; of a traceback in it (a server's, Ray's own), only the
    exceptions' lines: frames and the lines that link tracebacks say nothing to a user."""
    text = str(error)
    if TRACEBACK in text:
        lines = text.replace(TRACEBACK, "\n" + TRACEBACK).splitlines()
        keep = [line for line in lines if not line[:1].isspace()]
        text = "\n".join(line for line in keep if not line.startswith(TRACEBACK_LINKS))
    return " ".join(text.split())


def dead_actor_error(error: BaseException) -> ray.exceptions.ActorDiedError | None:
    """The ActorDiedError that `error` was raised from (through its causes, not an error
    only being handled as it was raised: a bug's), of an actor that had started (its
    process or node gone, or its owner's: the cluster's head stopped, say); else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, ray.exceptions.ActorDiedError) and not error.actor_init_failed:
            return error
        error = error.__cause__ or getattr(error, "cause", None)
    return None


WHY_CHARS = 300  # of Ray's reason an actor died, at most (its whole sentences)


def why_actor_died(error: ray.exceptions.ActorDiedError) -> str:
    """Why an actor died, as Ray says it after the actor's ids, on one line: its first
    sentences, up to WHY_CHARS."""
    text = what_failed(error)
    after_ids = re.search(r"\bip: \S+ (.+)", text)
    why = after_ids[1] if after_ids else text
    if len(why) <= WHY_CHARS:
        return why
    cut = why.rfind(". ", 0, WHY_CHARS)
    return why[: cut + 1] if cut > 0 else why[:WHY_CHARS] + "..."


def actor_class(error: ray.exceptions.ActorDiedError) -> str | None:
    """The class of the actor that died, as Ray names it (MapWorker for Ray Data's pools);
    None where its text does not say."""
    found = re.search(r"\bclass_name: (\w+)", str(error))
    return found[1] if found else None


def live_nodes() -> int:
    """Alive nodes of the connected cluster."""
    return sum(1 for n in ray.nodes() if n["Alive"])


def cpus_per_gpu() -> float | None:
    """The fewest CPUs per GPU over the connected cluster's alive GPU nodes; None without
    GPU nodes."""
    ratios = [
        n["Resources"].get("CPU", 0) / n["Resources"]["GPU"]
        for n in ray.nodes()
        if n["Alive"] and n["Resources"].get("GPU")
    ]
    return min(ratios) if ratios else None


def is_remote(address: str | None) -> bool:
    """Whether `address` names a cluster whose nodes may not see this machine's files: a
    Ray Client address, or a HOST:PORT whose host is not this machine."""
    if not address or address in ("auto", "local"):
        return False
    if address.startswith("ray://"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    return host not in ("", "localhost", "127.0.0.1", "::1", socket.gethostname())


def local_path_warnings(
    locations: dict[str, str], address: str | None = None, nodes: int = 1
) -> list[str]:
    """Warnings for the local paths among `locations` ({flag: location}) that the cluster's
    nodes may not see: on a cluster of several nodes (each with its own disk) or at a
    remote address."""
    local = {flag: uri for flag, uri in locations.items() if uri and not storage.is_s3(uri)}
    if nodes >= 2:
        why = f"the cluster has {nodes} nodes, each with its own disk"
    elif is_remote(address):
        why = f"the cluster at {address} may run on other machines"
    else:
        return []
    return [
        f"warning: {flag} {uri} is a local path but {why}; use s3:// (or a folder every node "
        "mounts) there"
        for flag, uri in local.items()
    ]


def insect_error_in(error: BaseException) -> InsectError | None:
    """An InsectError raised in a Ray task or worker, found inside Ray's wrapping exceptions;
    else an OSError there that names its file (a full disk under a training worker's
    writes: `errors.file_problem`), as one."""
    seen, todo, problem = set(), [(error, True)], None
    while todo:
        e, raised = todo.pop()  # raised: not reached through an exception being handled
        if id(e) in seen or e is None:
            continue
        seen.add(id(e))
        # Ray re-raises a task's InsectError as a class of both, whose text is Ray's header.
        if isinstance(e, InsectError) and not isinstance(e, ray.exceptions.RayError):
            return without_retry_note(e)
        # An OSError only handled on the way to another error (a bug) is not the problem.
        problem = problem or (file_problem(e) if raised else None)
        todo += [(e.__cause__, raised), (e.__context__, False), (getattr(e, "cause", None), raised)]
        todo += [(f, raised) for f in getattr(e, "worker_failures", {}).values()]
    # An actor whose constructor raised (a model actor refusing its model directory) dies
    # with an ActorDiedError that keeps only the traceback's text.
    found = INSECT_ERROR_LINE.findall(str(error))
    if found:
        return InsectError(found[-1].strip())
    return InsectError(problem) if problem else None


# What Ray Data appends to the text of an error its task gave up on (how many attempts, how
# to configure more): lines under insect's own one.
RETRY_NOTE = re.compile(r"\nFailed to .+ after \d+/\d+ attempts \(total backoff .*", re.S)


def without_retry_note(error: InsectError) -> InsectError:
    """`error` with its text as insect wrote it, less Ray Data's RETRY_NOTE."""
    if error.args and isinstance(error.args[0], str):
        error.args = (RETRY_NOTE.sub("", error.args[0]), *error.args[1:])
    return error


# Tries of a Ray Client session: the cluster's client server fails to start one now and then
# (its proxier forks the session's process while gRPC threads run: ray-project/ray#63202).
CLIENT_SESSION_TRIES = 3
SESSION_NOT_STARTED = "Starting Ray client server failed"  # Ray's text for that failure


def connect_client(address: str, source: str = "--address") -> None:
    """ray.init at a Ray Client address (ray://host:port, given as `source`) with this
    package shipped along. A session the cluster's client server failed to start is asked
    for again; any other failure, or the last, is one line."""
    import insectlib

    check_reachable(address, source)
    console.start_log()  # what Ray prints here, and streams from the cluster
    env = {"py_modules": [os.path.dirname(insectlib.__file__)]}
    for attempt in range(1, CLIENT_SESSION_TRIES + 1):
        try:
            # Its timeout's warning is left out: the error says it.
            with warnings.catch_warnings(), sigterm_while_ray_starts():
                warnings.filterwarnings("ignore", "Ray Client connection timed out")
                ray.init(address=address, runtime_env=env, logging_level="WARNING")
                interrupt_on_sigterm()
            return
        except Exception as e:  # whatever ray.init raises, the user gets one line
            if SESSION_NOT_STARTED not in str(e):
                raise InsectError(connection_problem(address, e)) from None
            if attempt == CLIENT_SESSION_TRIES:
                raise InsectError(
                    f"cannot connect to Ray at {address}: the cluster's Ray Client server "
                    f"failed to start this connection's session {attempt} times, a fault of "
                    "Ray's (ray-project/ray#63202); run the command again"
                ) from None
            with sigterm_while_ray_starts():  # Ray's handler is still the one in place
                ray.shutdown()


def address_in_use(address: str | None) -> tuple[str | None, str]:
    """The address ray.init takes given `address`, and the setting it comes from: --address,
    or $RAY_ADDRESS where that is absent or auto (ray.init reads it then)."""
    env = os.environ.get("RAY_ADDRESS")
    if env and address in (None, "auto"):
        return env, "$RAY_ADDRESS"
    return address, "--address"


def client_address(address: str | None) -> str | None:
    """The Ray Client address (ray://host:port) a command goes through (`address_in_use`),
    whose paths are the cluster's; None where the command is a driver itself."""
    target, _ = address_in_use(address)
    return target if target and target.startswith("ray://") else None


def run_as_driver(fn: Callable[..., T], cfg, **kwargs) -> T:
    """`fn(cfg, **kwargs)` here, or, for a Ray Client address, as a task on the cluster:
    Ray Data and Ray Train need a real driver process, which a Ray Client connection is
    not, so the driver's part runs on the cluster as a zero-CPU task with this package
    shipped along (paths are then the cluster's, as with `ray job submit`), its console
    lines relayed here (`runtime.relay`)."""
    address = client_address(getattr(cfg, "address", None))
    if address is None:
        return fn(cfg, **kwargs)
    try:  # a connection interrupted as it is made is shut down too
        connect_client(address, address_in_use(cfg.address)[1])
        return relay.run_relayed(fn, dataclasses.replace(cfg, address=None), **kwargs)
    except ray.exceptions.RayTaskError as e:  # the task's InsectError, not Ray's traceback
        raise insect_error_in(e) or e from None
    finally:
        # In the command's end, where a SIGTERM is let go; here for a library's caller.
        if not console.on_close(shutdown):
            shutdown()
