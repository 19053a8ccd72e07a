"""Network probes with bounded waits, for the checks before launch."""

from __future__ import annotations

import socket
import threading

CONNECT_TIMEOUT_S = 3.0  # a TCP connect (or name lookup) that takes longer counts as no answer


def resolve(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> list[str]:
    """The IP addresses of `host`, within `timeout` seconds (getaddrinfo has no timeout of its
    own, and a dead DNS server makes it wait for 30 s or more)."""
    result: list = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        raise TimeoutError(f"no answer from the name server within {timeout:.0f} s")
    if isinstance(result[0], OSError):
        raise result[0]
    return list(dict.fromkeys(info[4][0] for info in result[0]))


def try_connect(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within `timeout`, else why not."""
    try:
        address = resolve(host, port, timeout)[0]
        with socket.create_connection((address, port), timeout=timeout):
            return None
    except OSError as exc:
        return why(exc)


def can_bind(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))
            return True
        except OSError:
            return False


def why(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, (TimeoutError, socket.timeout)) and not str(exc):
        return f"no answer within {CONNECT_TIMEOUT_S:.0f} s"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
