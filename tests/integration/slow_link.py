"""A slow uplink for ssh: `ProxyCommand=python3 slow_link.py BYTES_PER_S %h %p`.

What the client sends reaches the server at BYTES_PER_S (a token bucket with a 4 KiB burst, so
that the key exchange stays quick); what the server sends comes back at full speed. Unlike
`sftp -l`, which sleeps *after* sending each 32 KiB request over loopback, this is what a slow
link does to an upload: the server receives an SFTP write request only once all of it has
crossed the link, so a 24 KB report sits open and empty on the server while it trickles in.

A standalone script (only the standard library): ssh runs it, not pytest.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

BURST = 4096.0


def downstream(sock: socket.socket) -> None:
    """Server to client, unthrottled, until the server closes."""
    out = sys.stdout.buffer
    while data := sock.recv(65536):
        out.write(data)
        out.flush()


def upstream(sock: socket.socket, rate: float) -> None:
    """Client to server through the token bucket, until the client closes its end."""
    tokens, last = BURST, time.monotonic()
    while data := os.read(0, 4096):
        view = memoryview(data)
        while view:
            now = time.monotonic()
            tokens, last = min(BURST, tokens + (now - last) * rate), now
            if tokens < 1:
                time.sleep((1 - tokens) / rate)
                continue
            count = min(len(view), int(tokens))
            sock.sendall(view[:count])
            tokens -= count
            view = view[count:]
    sock.shutdown(socket.SHUT_WR)


def main() -> None:
    rate, host, port = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    sock = socket.create_connection((host, port))
    back = threading.Thread(target=downstream, args=(sock,), daemon=True)
    back.start()
    try:
        upstream(sock, rate)
    except (BrokenPipeError, ConnectionError):
        return
    back.join()


if __name__ == "__main__":
    main()
