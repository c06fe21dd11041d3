"""Free TCP ports for rendezvous points, weight groups and servers on this host."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` and that this process has not handed out
    before: the OS may offer a just-released port again, so two servers set up before either
    binds would get the same one, and the second would find the first answering on it."""
    while True:
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
