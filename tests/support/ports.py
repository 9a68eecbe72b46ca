"""Free TCP ports on 127.0.0.1, for servers and rendezvous the tests start."""

from __future__ import annotations

import socket


def free_port(span: int = 1) -> int:
    """A port p with p .. p+span-1 all free on 127.0.0.1 right now (span 1: any free port)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + span - 1 > 65535:
            continue
        try:
            for offset in range(1, span):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no {span} consecutive free ports on 127.0.0.1")
