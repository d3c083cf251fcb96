"""Free TCP ports for servers started by tests."""

import socket


def free_port() -> int:
    """A port on 127.0.0.1 that the OS just handed out; another process could still take it before us."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
