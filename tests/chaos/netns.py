"""A second "host" on this machine for the replicas scenario: a network namespace joined to
this one by a veth pair, so one replica can be cut off from the broker, the store and Stripe
and healed, while the others run on.

The services listen on the host end's address (`Link.host`), which processes here reach
too. Cutting the link sets the host end down: the namespace's packets are dropped without
an answer (connections hang until their timeouts, as in a real partition), while this
side still reaches its own address. Needs CAP_NET_ADMIN (root in CI's container);
`open_link` says why not when it cannot."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    namespace: str
    host: str  # this side's address: services listen here
    guest: str  # the namespace's address
    host_end: str  # the veth end on this side

    def prefix(self) -> list[str]:
        """The command prefix that runs a command inside the namespace."""
        return ["ip", "netns", "exec", self.namespace]

    def cut(self) -> None:
        _ip("link", "set", self.host_end, "down")

    def heal(self) -> None:
        _ip("link", "set", self.host_end, "up")


class Unavailable(Exception):
    """Namespaces cannot be made here (no `ip`, or no CAP_NET_ADMIN)."""


def _ip(*args: str, namespace: str = "") -> None:
    cmd = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{' '.join(cmd)}: {exc}") from exc
    if done.returncode:
        raise Unavailable(f"{' '.join(cmd)}: {done.stderr.strip()}")


def _quietly(*cmd: str) -> None:
    """A cleanup command whose failure does not matter (nothing left to remove, or no `ip`
    at all: then _ip says so when the link is made)."""
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(cmd, capture_output=True, check=False, timeout=10)


@contextmanager
def open_link() -> Iterator[Link]:
    """A namespace and its veth pair, named and numbered by this process's id so that two
    runs at once do not meet; removed at the end (and a leftover of the same name first)."""
    n = os.getpid() % 250 + 1
    ns, host_end, guest_end = f"ucchaos{n}", f"ucv{n}h", f"ucv{n}g"
    link = Link(ns, f"10.231.{n}.1", f"10.231.{n}.2", host_end)
    _quietly("ip", "netns", "del", ns)
    _quietly("ip", "link", "del", host_end)
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_end, "type", "veth", "peer", "name", guest_end)
        _ip("link", "set", guest_end, "netns", ns)
        _ip("addr", "add", f"{link.host}/24", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("addr", "add", f"{link.guest}/24", "dev", guest_end, namespace=ns)
        _ip("link", "set", guest_end, "up", namespace=ns)
        _ip("link", "set", "lo", "up", namespace=ns)
        yield link
    finally:
        _quietly("ip", "link", "del", host_end)
        _quietly("ip", "netns", "del", ns)
