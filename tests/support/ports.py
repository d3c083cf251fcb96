"""Free TCP ports for servers started by tests."""

import socket

# Ports handed out by this process. A cluster asks for several before any server binds one, and the OS
# may offer the same free port twice in a row.
_handed_out: set[int] = set()


def free_port() -> int:
    """A port on 127.0.0.1 that the OS just handed out and this process has not handed out before; another
    process could still take it before the server binds it."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port that was not already handed out")
