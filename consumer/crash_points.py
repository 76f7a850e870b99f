"""Named points of the write sequence where a crash test stops the process.

Production installs nothing, so a point costs one check of a module attribute. The crash
harness runs the consumer through a test-only entry point (`tests/support/armed.py`) that
installs a hook killing the process at a chosen occurrence of a point, when a chosen
poison message is classified or has its header parsed (P7), or when a chosen push is sent
(unanswered.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

PointHook = Callable[[str], None]
MessagesHook = Callable[[Iterable[bytes | None]], None]
PushesHook = Callable[[Iterable[str]], None]

_point: PointHook | None = None
_messages: MessagesHook | None = None
_pushes: PushesHook | None = None
_headers: MessagesHook | None = None


def reached(name: str) -> None:
    """The write sequence reached the point `name`."""
    if _point is not None:
        _point(name)


def classifying(values: Iterable[bytes | None]) -> None:
    """These message values are about to be classified."""
    if _messages is not None:
        _messages(values)


def sending(identifiers: Iterable[str]) -> None:
    """The pushes with these identifiers are about to be encoded and sent to Stripe."""
    if _pushes is not None:
        _pushes(identifiers)


def reading_headers(values: Iterable[bytes | None]) -> None:
    """The C decoder is about to parse these message values' headers (untrusted bytes)."""
    if _headers is not None:
        _headers(values)


def install(
    point: PointHook | None = None,
    messages: MessagesHook | None = None,
    pushes: PushesHook | None = None,
    headers: MessagesHook | None = None,
) -> None:
    """Install (or, with no arguments, remove) the hooks; tests only."""
    global _point, _messages, _pushes, _headers
    _point, _messages, _pushes, _headers = point, messages, pushes, headers
