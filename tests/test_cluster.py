"""The three ways to run: no cluster, `ray start --head` + --address auto, `ray job submit`."""

from __future__ import annotations

import errno
import glob
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset
import pytest
import ray

from insectlib import storage
from insectlib.cli.main import main
from insectlib.config import ClassifyConfig
from insectlib.data import synthetic
from insectlib.errors import InsectError, RunStopped, StorageUnavailable, file_problem
from insectlib.model.meta import read_meta
from insectlib.runtime import connect, console, relay
from insectlib.runtime.connect import IDLE_WORKER_LIMIT, IDLE_WORKERS_SETTING
from tests import standins
from tests.conftest import (
    BIN,
    REPO,
    descends_from,
    expect_cli_error,
    run_cli,
    upload_tree,
    wait_for,
)
from tests.standins import DyingActor

SMALL = [
    "--arch",
    "resnet18",
    "--weights",
    "random",
    "--epochs",
    "1",
    "--image-size",
    "32",
    "--workers",
    "1",  # each worker is a process start: seconds here
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}:{env['PATH']}"  # `python` in job entrypoints is the venv's
    return {**env, **extra}


class Head:
    """A head started by cluster/start-head.sh (in the foreground, so it can be stopped
    without `ray stop`, which would also stop the test session's own Ray)."""

    def __init__(self, tmp_path, *flags: str, **env):
        self.port, self.dashboard = _free_port(), _free_port()
        self.env = _env(**env)
        self.log = open(tmp_path / f"head-{self.port}.log", "w")
        # Every port of its own: the test session's local Ray already holds the defaults
        # (a head whose job agent cannot bind 52365 answers "No available agent").
        self.client_port = _free_port()
        ports = ["--ray-client-server-port", str(self.client_port)]
        for flag in (
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--metrics-export-port",
            "--runtime-env-agent-port",
        ):
            ports += [flag, str(_free_port())]
        self.proc = subprocess.Popen(
            ["bash", str(REPO / "cluster" / "start-head.sh"), *flags, "--block", *ports],
            env={
                **self.env,
                "RAY_PORT": str(self.port),
                "DASHBOARD_PORT": str(self.dashboard),
                "NUM_CPUS": "2",
                "RAY": str(BIN / "ray"),
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{self.dashboard}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.dashboard), timeout=1):
                    return
            except OSError:
                assert self.proc.poll() is None, (tmp_path / f"head-{self.port}.log").read_text()
                time.sleep(1)
        raise AssertionError("head did not start")

    def submit(self, script: str, *args: str, **env):
        """`ray job submit`, blocking until the job ends. The head's job agent starts some
        seconds after its dashboard; Ray answers "try again later" until then."""
        for _ in range(24):
            result = run_cli(
                "ray",
                "job",
                "submit",
                "--address",
                self.url,
                "--working-dir",
                str(REPO),
                "--",
                "python",
                f"jobs/{script}",
                *args,
                env={**self.env, **env},
                timeout=400,
            )
            if "No available agent to submit job" not in result.stderr:
                return result
            time.sleep(5)
        return result

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()


def _check_model(model: str):
    meta = read_meta(model)
    assert meta.arch == "resnet18" and len(meta.epochs) == 1


def _check_outputs(predictions: str, inputs: int):
    fs, path = storage.pyarrow_filesystem(predictions)
    assert pyarrow.dataset.dataset(path, filesystem=fs).count_rows() == inputs


def test_start_head_script_authentication_switch(tmp_path):
    """Token authentication unless --no-auth, which warns; no Ray started (a stub `ray`)."""
    stub = tmp_path / "ray"
    stub.write_text('#!/bin/sh\necho "mode=$RAY_AUTH_MODE args=$*"\n')
    stub.chmod(0o755)
    script = str(REPO / "cluster" / "start-head.sh")
    env = _env(RAY=str(stub), RAY_AUTH_TOKEN="t" * 32)
    default = subprocess.run(["bash", script], capture_output=True, text=True, env=env)
    assert "mode=token args=start --head" in default.stdout and not default.stderr
    opt_out = subprocess.run(["bash", script, "--no-auth"], capture_output=True, text=True, env=env)
    assert "mode=disabled" in opt_out.stdout and "WITHOUT authentication" in opt_out.stderr


# insect's own Ray, as a command with no --address and no $RAY_ADDRESS starts it, up until
# the test has looked at its processes. First, whether a worker that ran a task is kept
# after 3 s idle while an actor holds every CPU (Ray's default kills it after 1 s).
OWN_RAY = """
import os, sys, time, ray
from insectlib.runtime.connect import init_ray
init_ray()
@ray.remote(num_cpus=int(ray.cluster_resources()["CPU"]))
class Busy:
    def ready(self):
        return True
busy = Busy.remote()
ray.get(busy.ready.remote())
@ray.remote(num_cpus=0)
def pid():
    return os.getpid()
worker = ray.get(pid.remote())
time.sleep(3)
print("kept" if os.path.exists(f"/proc/{worker}") else "killed", flush=True)
sys.stdin.readline()
"""


@pytest.mark.ray
def test_a_run_without_a_cluster_starts_no_dashboard_and_keeps_idle_workers(tmp_path):
    """Nobody is told of a dashboard there (Ray's lines go to the command's log), and it
    took start-up time and CPU from the run; the rest of Ray starts as before. (Training
    asks for it: Ray Train's State API calls need it.) While the model actors hold every
    CPU, Ray by default kills each worker a second after its task (a Parquet write, say),
    and the next task starts a new process, a second of CPU taken from the model: a Ray of
    insect's own keeps a few."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", IDLE_WORKER_LIMIT)}
    own = subprocess.Popen([sys.executable, "-c", OWN_RAY], env=env, cwd=tmp_path, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)  # fmt: skip
    try:
        kept = own.stdout.readline()
        lines = _command_lines_under(own.pid)
    finally:
        _, err = own.communicate("\n", timeout=120)
    assert kept == "kept\n" and own.returncode == 0, (kept, err[-3000:])
    assert any("gcs_server" in line for line in lines), lines
    assert any("raylet" in line for line in lines), lines
    # Without its dashboard, Ray keeps the dashboard's process for usage statistics only,
    # and starts none of its modules' processes (ray-dashboard-<module>).
    heads = [line for line in lines if "dashboard/dashboard.py" in line]
    assert len(heads) == 1 and "--disable-frontend" in heads[0], heads
    assert not [line for line in lines if line.startswith("ray-dashboard-")], lines


# On a machine of 1 CPU: connect.IDLE_WORKERS_KEPT, connect.GCS_GONE_S.
KEEP = {"_system_config": {"num_workers_soft_limit": 4, "gcs_rpc_server_reconnect_timeout_s": 20}}
OWN = {"include_dashboard": False, **KEEP}


@pytest.mark.parametrize(
    "address, environment, dashboard, started_with",
    [
        (None, None, False, OWN),  # a Ray of the command's own
        (None, None, True, KEEP),  # training's: Ray's default, a dashboard
        (None, "local", False, OWN),
        ("auto", "local", False, OWN),  # Ray reads $RAY_ADDRESS
        ("local", "127.0.0.1:1", False, OWN),
        ("auto", None, False, {}),  # a cluster's, as it is
        (None, "auto", False, {}),
    ],
)
def test_only_a_ray_of_the_commands_own_starts_without_a_dashboard_with_insects_settings(
    address, environment, dashboard, started_with, monkeypatch
):
    calls = []
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    variables = [connect.RAY_SETTING_VARIABLE.format(k) for k in KEEP["_system_config"]]
    for variable in variables:
        monkeypatch.delenv(variable, raising=False)
    if environment:
        monkeypatch.setenv("RAY_ADDRESS", environment)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    connect.init_ray(address, dashboard=dashboard)
    for variable in variables:  # the user's own settings: Ray's
        monkeypatch.setenv(variable, "-1")
    connect.init_ray(address, dashboard=dashboard)
    for variable in variables:
        monkeypatch.delenv(variable)
    monkeypatch.setenv(IDLE_WORKER_LIMIT, "-1")  # one setting of the user's: the other is ours
    connect.init_ray(address, dashboard=dashboard)
    monkeypatch.delenv(IDLE_WORKER_LIMIT)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)  # never fewer than Ray's one per CPU
    connect.init_ray(address, dashboard=dashboard)
    ours, theirs, one, large = ({k: v for k, v in c.items() if k in OWN} for c in calls)
    assert ours == started_with
    assert theirs == {k: v for k, v in started_with.items() if k != "_system_config"}
    if "_system_config" in started_with:
        system = started_with["_system_config"]
        assert one["_system_config"] == {
            k: v for k, v in system.items() if k != IDLE_WORKERS_SETTING
        }
        assert large["_system_config"] == {**system, IDLE_WORKERS_SETTING: 12}


def test_an_oserror_naming_its_file_in_a_ray_worker_is_one_line(ray_local):
    """A training worker's write to a full disk (metrics.json, the curves) ended in Ray
    Train's 40-line WorkerGroupError: an OSError that names its file, found inside Ray's
    wrapping, is the one line the CLI prints."""
    from insectlib.runtime.connect import insect_error_in

    @ray.remote
    def write():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/models/m1/metrics.json")

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(write.remote())
    assert insect_error_in(RuntimeError("no file named")) is None
    found = insect_error_in(raised.value)
    assert str(found) == "/models/m1/metrics.json: No space left on device"

    @ray.remote
    def bug():  # a bug met while handling a missing file: its traceback, not the file
        try:
            os.stat("/no/such/file")
        except FileNotFoundError:
            raise TypeError("a bug") from None

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(bug.remote())
    assert insect_error_in(raised.value) is None
    assert file_problem(OSError(errno.EBADF, os.strerror(errno.EBADF), 9999)) is None  # a fd


def test_a_driver_part_on_the_cluster_writes_its_console_lines_here(ray_local, capsys, monkeypatch):
    """Through a Ray Client the driver's part runs as a task: its lines come back in their
    order and streams, a bar's redraws as written (for the client's terminal), a last write
    never flushed too, and the lines written before it failed."""
    monkeypatch.setattr(console, "is_terminal", lambda: True)
    assert relay.run_relayed(standins.console_lines, 21) == 42
    lines = capsys.readouterr()
    assert lines.out == "planned\n"
    assert lines.err == "a warning\n\rbar 1/2\rbar 2/2\nterminal: True\n"
    with pytest.raises(ray.exceptions.RayTaskError, match="TypeError"):
        relay.run_relayed(standins.console_lines, None)
    assert capsys.readouterr().out == "planned\n"
    # The queue's actor gone (its node lost): the run goes on, and says where its lines go.
    assert relay.run_relayed(standins.lines_after_their_queue_died, 7) == 7
    lost = "the run goes on, its lines in the log from now on: their queue's actor died ("
    assert lost in capsys.readouterr().err


@pytest.mark.parametrize(
    "error, said",
    [
        (KeyboardInterrupt(), KeyboardInterrupt("the way on")),
        (
            ConnectionError("Client is shutting down."),  # its server (the head) gone mid-run
            RunStopped("lost the connection to the cluster (Ray Client: Client is shutting "
                       "down.), the run with it; once the cluster is up, the way on"),
        ),
    ],
)  # fmt: skip
def test_a_driver_part_on_the_cluster_gives_the_client_its_way_on(
    ray_local, monkeypatch, error, said
):
    """The way on the driver's part on the cluster says is what the client says, on a
    Ctrl-C there (here: as it writes the part's line) and when Ray Client loses its
    connection (a RunStopped, not a traceback)."""

    class Console(io.StringIO):
        def write(self, text: str) -> int:
            if "ready" in text:
                raise error
            return super().write(text)

    monkeypatch.setitem(relay.STREAMS, "out", Console)
    with pytest.raises(type(said)) as raised:
        relay.run_relayed(standins.part_with_a_way_on, 2)
    assert str(raised.value) == str(said)
    assert console._hints == []


@pytest.mark.parametrize(
    "error",
    [InsectError("--manifest m.csv, row 3001: no path in it"), StorageUnavailable("throttled")],
)
def test_an_insect_error_in_a_ray_data_task_is_its_own_line(ray_local, error):
    """A bad manifest row past the driver's first look failed in Ray Data's listing task,
    which appended two lines of its own to insect's (how many attempts it made, how to
    configure more): the CLI's one line became three."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    from insectlib.runtime.connect import insect_error_in

    class Failing(Datasource):  # as the listing's InputSource fails on a bad row
        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            def read_listing_part():
                raise error

            metadata = BlockMetadata(
                num_rows=None, size_bytes=None, input_files=None, exec_stats=None
            )
            return [ReadTask(read_listing_part, metadata)]

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.data.read_datasource(Failing(), override_num_blocks=1).materialize()
    assert "attempts" in str(raised.value.args)  # what Ray Data added, still there
    found = insect_error_in(raised.value)
    assert isinstance(found, InsectError) and str(found) == str(error)


def test_an_actor_that_died_and_was_not_replaced_stops_the_run_to_be_resumed(ray_local):
    """A model actor that Ray cannot restart (its owner's node gone with the cluster's head,
    where Ray's core has not ended the driver first) stopped classify with a traceback: it
    is one line saying which actor, why, in whole sentences, and how to go on. Here its
    restarts are off, for its death to be final (Ray Data's pools restart actors)."""
    from insectlib.classify.pipeline import ray_task_errors, resumable

    cfg = ClassifyConfig(input="in", model="m", output="o")
    with pytest.raises(RunStopped) as stopped, resumable(cfg), ray_task_errors():
        ray.data.range(1).map_batches(
            DyingActor, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0
        ).materialize()
    said = str(stopped.value)
    assert said.startswith("a model actor of the run died and was not replaced (The actor is dead")
    assert "\n" not in said and len(said) < 500, said
    assert said.endswith(
        ".); once the cluster is up, the same command with --resume classifies only the "
        "inputs without a row"
    ), said


def test_a_sigterm_goes_to_whatever_takes_ctrl_c_at_that_moment():
    """After ray.init, SIGTERM (`ray job stop`) reaches the Ctrl-C handler of the moment:
    Ray Train's during a fit, which aborts the run through its controller (Python's own
    raised past it before), and Python's where none is set, a KeyboardInterrupt."""
    from insectlib.runtime.connect import interrupt_on_sigterm

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    got = []
    try:
        interrupt_on_sigterm()
        signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))  # a fit's
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:  # not a fail of the whole session
            pytest.fail("SIGTERM raised past the Ctrl-C handler set at that moment")
        assert got == [signal.SIGINT]
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job: Python's own
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


@pytest.mark.parametrize("address", [None, "auto"])  # ray.init reads $RAY_ADDRESS for both
def test_an_unreachable_ray_address_is_refused_before_ray_init(address, monkeypatch):

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    with pytest.raises(InsectError, match=r"127.0.0.1:1: .*; check \$RAY_ADDRESS \("):
        connect.init_ray(address)


@pytest.mark.parametrize(
    "address, environment, source",
    [("ray://127.0.0.1:1", None, "--address"), (None, "ray://h:10001", "$RAY_ADDRESS"),
     ("auto", "ray://h", "$RAY_ADDRESS"), ("127.0.0.1:1", "ray://h", None)],
)  # fmt: skip
def test_a_ray_client_address_is_never_connected_to_as_a_driver(
    address, environment, source, monkeypatch
):
    """A command's own Ray Data and Ray Train cannot run over a Ray Client connection:
    `run_as_driver` sends them to the cluster, and init_ray refuses such an address (from a
    command that drives Ray itself, `insect demo`, or a library caller) in one line."""

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
    monkeypatch.setenv("RAY_ADDRESS", environment or "")
    if source is None:  # --address HOST:PORT is used, not the environment's
        with pytest.raises(InsectError, match=r"127.0.0.1:1: .*; check --address \("):
            connect.init_ray(address)
        return
    client = address if source == "--address" else environment
    with pytest.raises(InsectError, match=f"{re.escape(source)} {client} is a Ray Client"):
        connect.init_ray(address)


def test_an_ipv6_address_in_rays_brackets_is_reachable():
    """`ray job submit` gives its driver the head's address as Ray writes it: [::1]:6379."""

    try:
        server = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with server:
        connect.check_reachable(f"[::1]:{server.getsockname()[1]}", "$RAY_ADDRESS")


# What ray.init raises when the cluster's Ray Client server fails to start the connection's
# session (ray-project/ray#63202, reported at about 7% of connections; seen in this suite).
SESSION_NOT_STARTED = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File "proxier.py", line 772, in Datapath\n    raise RuntimeError(\n'
    "RuntimeError: Starting Ray client server failed. See ray_client_server_23000.err for "
    "detailed logs.\n"
)
# And when its runtime environment fails: a traceback in a traceback, one frame of which is
# in a module named "authentication".
NO_RUNTIME_ENV = ConnectionAbortedError(
    "Initialization failure from server:\nTraceback (most recent call last):\n"
    '  File "proxier.py", line 1, in Datapath\n    raise RuntimeError(\n'
    "RuntimeError: Failed to create runtime_env for Ray client server, it is caused by:\n"
    "Traceback (most recent call last):\n"
    '  File "ray/_private/authentication/tokens.py", line 3, in load\n    open(path)\n'
    "FileNotFoundError: gcs://_ray_pkg.zip\n"
)


def test_a_ray_client_session_the_cluster_failed_to_start_is_asked_for_again(
    monkeypatch, capsys, tmp_path
):
    """ray://: a session the client server failed to start is asked for again (twice at
    most); the last failure, or any other, is one line naming the address, not a traceback."""

    calls = []

    def init(failures: int, error: Exception):
        def fake(**kwargs):
            calls.append("init")
            if calls.count("init") <= failures:
                raise error

        return fake

    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    with socket.create_server(("127.0.0.1", 0)) as server:  # a port that answers
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setattr(ray, "init", init(2, SESSION_NOT_STARTED))
        connect.connect_client(address)
        assert calls == ["init", "shutdown", "init", "shutdown", "init"]

        calls.clear()
        monkeypatch.setattr(ray, "init", init(3, SESSION_NOT_STARTED))
        argv = ["classify", "in", "--model", "m", "--output", str(tmp_path / "o")]
        assert expect_cli_error(capsys, [*argv, "--address", address]) == (
            f"insect: error: cannot connect to Ray at {address}: the cluster's Ray Client "
            "server failed to start this connection's session 3 times, a fault of Ray's "
            "(ray-project/ray#63202); run the command again"
        )
        assert calls.count("init") == 3

        # Not asked again: they would fail the same way. A client without the cluster's
        # token times out (after 30 s on Ray 2.60).
        for error, said in (
            (ConnectionError("ray client connection timeout"), "ConnectionError: ray client "
             "connection timeout; where the cluster uses token authentication, set "
             "RAY_AUTH_MODE=token"),
            (NO_RUNTIME_ENV, "ConnectionAbortedError: Initialization failure from server: "
             "RuntimeError: Failed to create runtime_env for Ray client server, it is caused "
             "by: FileNotFoundError: gcs://_ray_pkg.zip"),
        ):  # fmt: skip
            calls.clear()
            monkeypatch.setattr(ray, "init", init(1, error))
            with pytest.raises(InsectError) as refused:
                connect.connect_client(address)
            assert calls == ["init"]
            assert str(refused.value).startswith(f"cannot connect to Ray at {address}: {said}")

    # A port that does not answer: refused at once, not after Ray Client's 30 s.
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("ray.init was called"))
    with pytest.raises(InsectError, match=r"ray://127.0.0.1:1: .*; check --address \("):
        connect.connect_client("ray://127.0.0.1:1")


def test_a_sigterm_while_a_ray_client_connects_interrupts_the_command(tmp_path):
    """A SIGTERM (`timeout`, a supervisor) while ray.init waits for a Ray Client connection
    (30 s where the server does not answer it, as a driver without the cluster's token
    finds): the command says it was interrupted (exit 130). Ray's handler ended it with
    exit 15 and no word."""
    with socket.create_server(("127.0.0.1", 0)) as server:  # answers TCP, never gRPC
        server.settimeout(60)
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        argv = ["classify", "in", "--model", "m", "--output", "o", "--address", address]
        driver = subprocess.Popen(
            [str(BIN / "insect"), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=tmp_path,
        )  # fmt: skip
        try:
            server.accept()[0].close()  # the address checked: it answers
            held, _ = server.accept()  # ray.init's connection, under Ray's SIGTERM handler
            driver.send_signal(signal.SIGTERM)
            _, err = driver.communicate(timeout=60)
            held.close()
        finally:
            driver.kill()
    assert driver.returncode == 130, err[-2000:]
    assert err.startswith("insect: interrupted") and "Traceback" not in err, err[-2000:]


def test_a_ray_client_address_in_ray_address_goes_through_ray_client(monkeypatch, capsys, tmp_path):
    """$RAY_ADDRESS=ray://... with no --address (or auto, which reads it) is taken as
    --address ray://... is: the command's driver part runs on the cluster (its sessions asked
    for again, its paths the cluster's, not looked at here), not in this process over a
    client connection."""
    calls = []

    def fake(**kwargs):
        calls.append(kwargs.get("address"))
        raise SESSION_NOT_STARTED

    monkeypatch.setattr(ray, "init", fake)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    argv = ["classify", "in", "--model", "m", "--output", str(tmp_path / "o")]
    with socket.create_server(("127.0.0.1", 0)) as server:  # a port that answers
        address = f"ray://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("RAY_ADDRESS", address)
        for extra in ([], ["--address", "auto"]):
            calls.clear()
            err = expect_cli_error(capsys, [*argv, *extra])
            assert f"at {address}: " in err and "session 3 times" in err, err
            assert calls == [address] * 3
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:1")  # a port that does not answer
    assert main(argv) == 2
    said = capsys.readouterr()
    assert "check $RAY_ADDRESS (" in said.err and "log: " not in said.out  # nor a log opened
    assert calls == [address] * 3  # refused before ray.init


def test_addresses_are_checked_as_ray_reads_them_and_errors_are_one_line(monkeypatch):
    """ray:// is checked like HOST:PORT (without a port, at gRPC's default, as Ray Client
    dials; not where Ray lets gRPC go through a proxy); a traceback inside Ray's error text (GCS's,
    mid-line) leaves only its exceptions' lines, and a frame in a module named
    "authentication" does not make it a token problem."""

    monkeypatch.setattr(connect, "GRPC_DEFAULT_PORT", 1)  # 443 might answer here
    for variable in (*connect.GRPC_PROXY_VARIABLES, "RAY_grpc_enable_http_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(
        InsectError, match=r"^cannot connect to Ray at ray://127.0.0.1 \(port 1, gRPC's default\): "
    ):
        connect.check_reachable("ray://127.0.0.1")  # not a 30 s wait for Ray Client
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:1")  # Ray's gRPC leaves it unused
    with pytest.raises(InsectError, match=r"^cannot connect to Ray at ray://127.0.0.1 \("):
        connect.check_reachable("ray://127.0.0.1")
    monkeypatch.setenv("RAY_grpc_enable_http_proxy", "1")  # unless told to use it
    connect.check_reachable("ray://127.0.0.1")  # gRPC's to dial through the proxy
    monkeypatch.delenv("https_proxy")
    for address in ("ray://127.0.0.1:1/", "ray://127.0.0.1:abc", "ray://[::1]:1"):
        with pytest.raises(InsectError, match=r"^cannot connect to Ray at ray://.*; check --add"):
            connect.check_reachable(address)
    gcs = RuntimeError(
        "Failed to connect to GCS. Last connection error: Traceback (most recent call last):\n"
        '  File "ray/_private/authentication/grpc.py", line 9, in call\n    stub()\n'
        "ray.exceptions.RpcError: deadline exceeded\n\n"
        "The above exception was the direct cause of the following exception:\n"
    )
    assert connect.connection_problem("127.0.0.1:6379", gcs) == (
        "cannot connect to Ray at 127.0.0.1:6379: RuntimeError: Failed to connect to GCS. "
        "Last connection error: ray.exceptions.RpcError: deadline exceeded"
    )


def _command_lines_under(ancestor: int) -> list[str]:
    """The command lines of the processes `ancestor` started, through any chain."""
    lines = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            if descends_from(int(name), ancestor):
                lines.append(Path(f"/proc/{name}/cmdline").read_text(errors="replace"))
        except OSError:  # ended while looked at
            continue
    return [line.replace("\0", " ") for line in lines]


# A stand-in for one of a head's processes: on SIGTERM it notes its name and when (the
# raylet a second later, as a real one drains); "stubborn" ignores SIGTERM.
STAND_IN = """
import signal, sys, time
def stop(*_):
    time.sleep(1 if sys.argv[2] == "raylet" else 0)
    open(sys.argv[1], "a").write(f"{sys.argv[2]} {time.time()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if sys.argv[2] == "stubborn" else stop)
print("up", flush=True)
time.sleep(120)
"""


def _stop_stand_ins(tmp_path, names: list[str], grace: int) -> tuple[list[int], dict, float]:
    """Start a stand-in per name (its argv[0] a path ending in the name, its arguments
    naming a head's temporary directory), run stop.sh on them: (exit codes, {name: time
    of its SIGTERM}, seconds stop.sh took)."""
    tmp_path.mkdir()
    temp_dir, log = tmp_path / "ray-head", tmp_path / "stopped"
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    procs = []
    try:
        for name in names:
            run = f'exec -a "$0" {sys.executable} {script} {log} {name} --dir={temp_dir}/x'
            argv = ["bash", "-c", run, str(tmp_path / name)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE))
        for proc in procs:
            assert proc.stdout.readline() == b"up\n"
        started = time.monotonic()
        env = {**os.environ, "RAY_TEMP_DIR": str(temp_dir), "GRACE": str(grace)}
        stop = subprocess.run(["bash", str(REPO / "cluster" / "stop.sh")], env=env, text=True,
                              capture_output=True, timeout=60)  # fmt: skip
        took = time.monotonic() - started
        assert stop.returncode == 0 and f"{len(names)} processes" in stop.stdout, stop
        assert not stop.stderr, stop.stderr
        codes = [p.wait(timeout=10) for p in procs]
    finally:
        for proc in procs:
            proc.kill()
    lines = [line.split() for line in log.read_text().splitlines()]
    return codes, {name: float(t) for name, t in lines}, took


def test_stop_sh_stops_the_gcs_after_the_rest(tmp_path):
    """stop.sh sends SIGTERM to the GCS only once the head's other processes are gone (a
    head started without --block has no `ray start` to order them; stopped together, a
    token-authenticated head's processes waited on the GCS until the SIGKILL), and all stop
    on SIGTERM, not after the grace period. A process that ignores SIGTERM gets SIGKILL at
    the end of GRACE, and does not keep the GCS from its SIGTERM."""
    codes, stopped, took = _stop_stand_ins(tmp_path / "a", ["gcs_server", "raylet", "dash"], 20)
    assert codes == [0, 0, 0] and took < 10, (codes, took)
    assert max(stopped["raylet"], stopped["dash"]) < stopped["gcs_server"], stopped
    codes, stopped, took = _stop_stand_ins(tmp_path / "b", ["gcs_server", "stubborn"], 3)
    assert codes == [0, -signal.SIGKILL] and list(stopped) == ["gcs_server"], (codes, stopped)


@pytest.mark.parametrize("grace", ["nan", "2.5", "-1", "1e9x"])
def test_stop_sh_refuses_a_grace_that_is_not_whole_seconds(grace, tmp_path):
    """One line naming GRACE and exit 2, before it looks for a head to signal."""
    env = {**os.environ, "RAY_TEMP_DIR": str(tmp_path / "ray-head"), "GRACE": grace}
    stop = subprocess.run(["bash", str(REPO / "cluster" / "stop.sh")], env=env, text=True,
                          capture_output=True, timeout=30)  # fmt: skip
    assert stop.returncode == 2 and not stop.stdout, stop
    assert stop.stderr == f"stop.sh: GRACE must be a whole number of seconds, not '{grace}'\n"


def test_token_head_serves_every_way_to_run_and_stop_sh_stops_only_it(
    ray_local, s3_server, calibrated, labelled_root, unlabelled, tmp_path
):
    """One head started with no flags (token authentication: start-head.sh creates the token,
    mode 600, in the HOME it runs with). Drivers with that HOME and RAY_AUTH_MODE=token get
    in by --address HOST:PORT and ray://; a stranger without the token gets one clear error; a
    job with a wrong token is denied; training and classification jobs through S3 succeed,
    and the S3 secret and the token appear in no output, object or log. Then
    cluster/stop.sh stops this head (every process naming its folder), and not the test
    session's own Ray beside it; a classify driver it cuts off says so in one line."""
    model, _ = calibrated
    home = tmp_path / "home"
    home.mkdir()
    head = Head(tmp_path, HOME=str(home), RAY_AUTH_MODE="token")
    try:
        token_file = home / ".ray" / "auth_token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        token = token_file.read_text().strip()
        _drivers_with_and_without_the_token(head, model, unlabelled, tmp_path)
        outputs = _s3_jobs(head, s3_server, labelled_root, unlabelled, token)
        assert len(outputs) > 20
        assert not [o[:200] for o in outputs if s3_server.secret in o]
        assert not [o[:200] for o in outputs if token in o]  # nor the Ray token
        _stop_sh_stops_only(head, model, tmp_path)
    finally:
        head.stop()


def _drivers_with_and_without_the_token(head: Head, model: str, unlabelled, tmp_path) -> None:
    images = os.path.dirname(next(iter(unlabelled)))
    # HOST:PORT, not auto: with the session's own Ray beside the head, auto may pick either
    # (Ray takes any running cluster when the head's address file is not in /tmp/ray).
    gcs, client = f"127.0.0.1:{head.port}", f"ray://127.0.0.1:{head.client_port}"
    for name, address in (("gcs", gcs), ("client", client)):
        out = str(tmp_path / name)
        result = run_cli(
            "insect", "classify", images, "--model", model, "--output", out,
            "--address", address, env=head.env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        _check_outputs(out, len(unlabelled))
    # Through ray:// too, the console is insect's: the plan, the bar, the summary; Ray's
    # lines (streamed from the cluster, in colour, with a pid) in this machine's log.
    said = [line.split()[0] for line in result.stdout.splitlines()]
    assert said == ["log:", "classifying", str(len(unlabelled))], result.stdout
    assert {line.split()[0] for line in result.stderr.splitlines()} == {"classified:"}
    # An error of the driver's part, which runs on the cluster: its one line, not Ray's
    # traceback of the task.
    missing = run_cli(
        "insect", "classify", images, "--model", str(tmp_path / "no-model"),
        "--output", str(tmp_path / "p5"), "--address", client, env=head.env,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr[-3000:]
    assert missing.stderr.startswith("insect: error: ") and "no-model" in missing.stderr
    assert missing.stderr.count("\n") == 1, missing.stderr
    stranger = run_cli(
        "insect", "classify", images, "--model", model, "--output", str(tmp_path / "p4"),
        "--address", f"127.0.0.1:{head.port}",
        env=_env(HOME=str(tmp_path)),
    )  # fmt: skip
    assert stranger.returncode == 2, stranger.stderr[-3000:]
    assert "token authentication" in stranger.stderr and "Traceback" not in stranger.stderr


def _s3_jobs(head: Head, s3_server, labelled_root, unlabelled, token: str) -> list[str]:
    """Both jobs through S3, their S3 secret only in the environment; returns every output,
    object and log the secret must not appear in."""
    client = s3_server.client()
    client.create_bucket(Bucket="insect-jobs")
    upload_tree(client, labelled_root, "insect-jobs", "labelled")
    upload_tree(client, os.path.dirname(next(iter(unlabelled))), "insect-jobs", "images")
    denied = head.submit("train.py", "--help", RAY_AUTH_TOKEN="wrong-" + token)
    assert denied.returncode != 0
    assert "AuthenticationError" in denied.stderr and "token is invalid" in denied.stderr
    train = head.submit(
        "train.py", "s3://insect-jobs/labelled", "--output", "s3://insect-jobs/model",
        "--storage", "s3://insect-jobs/runs", *SMALL,
    )  # fmt: skip
    assert train.returncode == 0 and "succeeded" in train.stdout, train.stdout[-3000:]
    assert "epoch 1/1" in train.stdout
    job = head.submit(
        "classify.py", "s3://insect-jobs/images", "--model", "s3://insect-jobs/model",
        "--output", "s3://insect-jobs/predictions",
    )  # fmt: skip
    assert job.returncode == 0 and "succeeded" in job.stdout, job.stdout[-3000:]
    _check_model("s3://insect-jobs/model")
    _check_outputs("s3://insect-jobs/predictions", len(unlabelled))
    listing = run_cli("ray", "job", "list", "--address", head.url, env=head.env)
    assert "jobs/classify.py" in listing.stdout  # the entrypoints as the dashboard shows them
    outputs = [r.stdout for r in (denied, train, job, listing)]
    outputs += [r.stderr for r in (denied, train, job, listing)]
    for obj in client.list_objects_v2(Bucket="insect-jobs")["Contents"]:
        body = client.get_object(Bucket="insect-jobs", Key=obj["Key"])["Body"].read()
        outputs.append(body.decode("latin-1"))
    with open(head.log.name) as f:
        session = re.search(r"(/tmp/ray[^/]*/session_[^/]+)/logs", f.read())
    assert session, "head log names its session"
    for dirpath, _, files in os.walk(session.group(1) + "/logs"):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                outputs.append(f.read().decode("latin-1"))
    return outputs


def _stop_sh_stops_only(head: Head, model: str, tmp_path) -> None:
    temp_dir = f"/tmp/ray-insect-{head.port}"
    assert _processes_naming(temp_dir), "the head's processes name its folder"
    driver, said = _classifying(head, model, tmp_path)
    env = {**head.env, "RAY_PORT": str(head.port), "GRACE": "40"}
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(REPO / "cluster" / "stop.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "stopping the Ray head" in result.stdout, result
    # A busy head (the driver's actors, the suite beside it) took 15 s to stop by SIGTERM.
    assert time.monotonic() - started < 30, "stopped by SIGTERM, not by the SIGKILL after GRACE"
    assert not _processes_naming(temp_dir)
    assert head.proc.wait(timeout=30) is not None
    assert ray.is_initialized() and ray.get(ray.remote(lambda: 1).remote()) == 1
    # The driver cut off: Ray's core ends it at once (exit 1), and the console gets one line
    # (its watcher's, just after); or Ray Data finds its model actors gone first, and the
    # run stops in one line (exit 2), not a traceback.
    code = driver.wait(timeout=60)
    ours = lambda: [line for line in said.read_text().splitlines() if "insect:" in line]  # noqa: E731
    lines = wait_for(ours, timeout=10, what="the driver's line")
    assert len(lines) == 1 and "Traceback" not in said.read_text(), said.read_text()[-3000:]
    if code == 1:
        assert lines[0].startswith("insect: error: stopped at once"), lines
        assert "the same command with --resume classifies only" in lines[0], lines
    else:
        assert code == 2, said.read_text()[-3000:]
        died = "insect: error: a model actor of the run died and was not replaced ("
        assert lines[0].startswith(died), lines
        assert lines[0].endswith("; once the cluster is up, the same command with --resume "
                                 "classifies only the inputs without a row"), lines  # fmt: skip


def _classifying(head: Head, model: str, tmp_path) -> tuple[subprocess.Popen, Path]:
    """A classify driver on `head`, under way (its first Parquet part written), and the
    file its console's error stream goes to. When the head stops, Ray's core ends the
    driver: at once where its node's raylet goes (as here), else once the GCS has not
    answered for $RAY_gcs_rpc_server_reconnect_timeout_s (60 s by default; 5 here)."""
    images, out, said = tmp_path / "many", tmp_path / "cut-off", tmp_path / "cut-off.err"
    synthetic.make_unlabelled(str(images), count=1000, size=(64, 48))
    argv = ["classify", str(images), "--model", model, "--output", str(out)]
    argv += ["--batch-size", "4", "--rows-per-file", "40", "--address", f"127.0.0.1:{head.port}"]
    env = {**head.env, "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
    with open(said, "w") as err:
        driver = subprocess.Popen(
            [str(BIN / "insect"), *argv], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
    under_way = lambda: driver.poll() is not None or list(out.glob("*.parquet"))  # noqa: E731
    wait_for(under_way, what="the driver's first Parquet part")
    assert driver.poll() is None, said.read_text()[-3000:]
    return driver, said


def _processes_naming(folder: str) -> list[int]:
    found = []
    for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            args = open(cmdline, "rb").read().split(b"\0")
        except OSError:
            continue
        if any(folder.encode() in arg for arg in args):
            found.append(int(cmdline.split("/")[2]))
    return found


if __name__ == "__main__":
    pytest.main([__file__])
