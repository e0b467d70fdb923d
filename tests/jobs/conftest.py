"""The services the end-to-end job tests share, one of each per test package, all on loopback:

- ``s3``: moto's S3 server behind a TCP proxy that can be taken down for a while (an S3 outage);
- ``postgres``: Debian's PostgreSQL, a fresh cluster in a temp dir;
- ``mlflow_server``: the team MLflow server: ``mlflow server`` on that PostgreSQL, artifacts in ``s3://``;
- ``head``: a two-node Ray cluster, a head and a second ``ray start --address`` node, each with its own
  ``--temp-dir``, sharing no disk where it matters: the second node runs in a mount namespace of its own, with
  empty private tmpfs over every folder the tests and the drivers write (pytest's temp root, the head's temp dir
  with the jobs' working dirs, the downloads cache), as nodes of ``cluster/a100.yaml`` share no filesystem; its
  environment carries fake secrets (AWS keys, a judge API key, an MLflow password) that the secrets test looks
  for everywhere.
"""

from __future__ import annotations

import glob
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import free_port

BIN = Path(sys.executable).parent
BUCKET = "lvpruning"  # checkpoints (runs/), images (toy/), MLflow artifacts (mlflow/)
# What the secrets test looks for: fake credentials in the cluster's environment, as a team would set them.
SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIA{secrets.token_hex(8).upper()}",
    "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
    "OPENAI_API_KEY": f"sk-{secrets.token_urlsafe(24)}",
    "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(18),
}
RAY_AUTH_TOKEN = secrets.token_hex(16)  # the cluster's token (RAY_AUTH_MODE=token): scanned for too


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<target>``. ``down()`` stops listening and drops every open
    connection (clients see connection refused or reset, as when a server goes away); ``up()`` listens again on the
    same port."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        with self._lock:
            for connection in self._open:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                connection.close()
            self._open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            with self._lock:
                self._open -= {src, dst}


@dataclass
class S3:
    endpoint: str  # through the proxy: what every client is given
    proxy: TcpProxy
    env: dict[str, str]  # endpoint, region and the (fake, secret) credentials

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="package")
def s3() -> Iterator[S3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    proxy = TcpProxy(server.get_host_and_port()[1])
    endpoint = f"http://127.0.0.1:{proxy.port}"
    env = {
        "AWS_ACCESS_KEY_ID": SECRETS["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": SECRETS["AWS_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,  # mlflow server's artifact store
    }
    store = S3(endpoint, proxy, env)
    store.client().create_bucket(Bucket=BUCKET)
    yield store
    proxy.down()
    server.stop()


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install postgresql (.ci/run does)")
    return Path(found[-1]).parent


@pytest.fixture(scope="package")
def postgres() -> Iterator[str]:
    """A PostgreSQL cluster of its own on a free loopback port (trust authentication, loopback only); yields the
    SQLAlchemy URI of its database ``mlflow``. As root, the server runs as the ``postgres`` user (it refuses root)."""
    bindir, port = _postgres_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="lvp-pg-"))  # not under pytest's 0700 temp root: postgres must reach it
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def pg(*argv: str) -> None:
        subprocess.run([*as_user, *argv], check=True, capture_output=True, timeout=120, cwd=root)

    data = root / "data"
    pg(str(bindir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
    try:
        pg(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow")
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


def pg_dump(uri: str) -> str:
    """The whole MLflow database as SQL text (what the secrets test scans)."""
    done = subprocess.run([str(_postgres_bin() / "pg_dump"), uri], check=True, capture_output=True, timeout=120)
    return done.stdout.decode()


@pytest.fixture(scope="package")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, postgres: str, s3: S3) -> Iterator[str]:
    """The team MLflow server: ``mlflow server`` with PostgreSQL as backend store and proxied artifacts in
    ``s3://lvpruning/mlflow`` (moto), on a free loopback port; yields its http URI. Tests share it, so each uses
    experiments of its own names."""
    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres, "--workers", "1"]
    argv += ["--artifacts-destination", f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port)]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | s3.env
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runner (7 huey consumers) on 2 cores
    log = open(root / "server.log", "wb")
    # A process group of its own: uvicorn's worker goes with it at the end.
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow server exited ({server.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


def ray_start(argv: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    if done.returncode:
        output = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed ({done.returncode}):\n{output}")


@dataclass
class Head:
    """A two-node Ray cluster on this machine: the head (1 CPU) and a second node (2 CPUs), each with its own temp
    dir and one ``trainer`` resource (a job asking for one per worker gets one worker per node)."""

    dashboard: str  # http://127.0.0.1:<port>: the job server (ray job submit --address)
    gcs: str  # 127.0.0.1:<port>: what a driver and the second node join
    env: dict[str, str]  # the environment the Ray CLI, the nodes and the drivers run with
    tmp: Path
    ray_root: Path  # each node's --temp-dir under it (head/, node2/): short, as Unix socket paths must be
    hidden: tuple[Path, ...]  # what the second node does not see: an empty tmpfs of its own over each
    temp_dirs: list[Path] = field(default_factory=list)  # each node's --temp-dir: its logs

    def start_second_node(self) -> None:
        """``ray start --address`` in a new mount namespace (``unshare``; as root, or mapped to root in a user
        namespace) whose first act is a private tmpfs over each of ``hidden``: its processes (raylet, workers,
        actors) see the machine's files except those, which they see empty; the head and the drivers see all."""
        node = self.ray_root / "node2"
        argv = [str(BIN / "ray"), "start", f"--address={self.gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=2"]
        argv += ['--resources={"trainer": 1}', "--disable-usage-stats", f"--temp-dir={node}"]
        for path in self.hidden:
            path.mkdir(parents=True, exist_ok=True)
        mounts = [f"mount -t tmpfs -o size=4g,mode=1777 lvp-node2 {shlex.quote(str(p))}" for p in self.hidden]
        user = [] if os.geteuid() == 0 else ["--map-root-user"]
        script = " && ".join([*mounts, f"exec {shlex.join(argv)}"])
        ray_start(["unshare", *user, "--mount", "--propagation", "private", "sh", "-c", script], self.env, self.tmp)
        if node not in self.temp_dirs:
            self.temp_dirs.append(node)
        self.wait_for_nodes(2)

    def stop_second_node(self) -> None:
        """What ``ray stop`` does on that node (SIGTERM, then SIGKILL after 10 s), to that node's processes only:
        those whose command line names its temp dir (raylet, agents, workers)."""
        pattern = str(self.ray_root / "node2")
        subprocess.run(["pkill", "-TERM", "-f", pattern], check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(["pgrep", "-f", pattern], capture_output=True).stdout:
            time.sleep(0.5)
        subprocess.run(["pkill", "-KILL", "-f", pattern], check=False)

    def wait_for_nodes(self, count: int, timeout: float = 60) -> None:
        script = "import ray; ray.init(); print(sum(n['Alive'] for n in ray.nodes()))"
        env = self.env | {"RAY_ADDRESS": self.gcs}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
            if done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise TimeoutError(f"the cluster did not reach {count} live nodes in {timeout} s")


@pytest.fixture(scope="package")
def head(tmp_path_factory: pytest.TempPathFactory, s3: S3) -> Iterator[Head]:
    """The two-node cluster, token authentication as Ray sets it up, dashboard and job server on 127.0.0.1.

    Teardown runs ``ray stop --force``, which stops every Ray cluster on the machine: run this suite where no
    other Ray cluster is needed (as CI does)."""
    tmp = tmp_path_factory.mktemp("head")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env |= s3.env | SECRETS | {"MLFLOW_TRACKING_USERNAME": "lvpruning-ci"}  # a name, not a secret: MLflow records it
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this environment's
    env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"] = "token", RAY_AUTH_TOKEN  # what every node and client presents
    dashboard, gcs = free_port(), free_port()
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}"]
    start += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=1"]
    ray_root = Path(tempfile.mkdtemp(prefix="lvp-ray-"))
    start += ['--resources={"trainer": 1}', "--disable-usage-stats", f"--temp-dir={ray_root / 'head'}"]
    ray_start(start, env, tmp)
    # pytest's temp root (every test's files, the MLflow server's), the head's temp dir (the jobs' working dirs and
    # what their drivers write there), the downloads cache of pipelines.storage.local_copy
    hidden = (tmp_path_factory.getbasetemp(), ray_root / "head", Path(tempfile.gettempdir()) / "lvpruning-cache")
    cluster = Head(f"http://127.0.0.1:{dashboard}", f"127.0.0.1:{gcs}", env, tmp, ray_root, hidden, [ray_root / "head"])
    try:
        cluster.start_second_node()
        yield cluster
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(ray_root, ignore_errors=True)
