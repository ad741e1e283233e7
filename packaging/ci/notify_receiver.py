#!/usr/bin/python3
"""A stand-in for systemd's end of NOTIFY_SOCKET, for packaging/ci-package-test.sh.

    notify_receiver.py SOCKET LOG

Binds a datagram Unix socket at SOCKET (mode 0666, so the daemon's unprivileged user can send)
and appends each notification to LOG as one line: `pid=<sender pid> <fields joined by |>`.
The sender's pid comes from the kernel (SO_PASSCRED), so the test can check that only the main
process notifies, as systemd's NotifyAccess=main requires. Stops on SIGTERM.
"""

import os
import signal
import socket
import struct
import sys


def main() -> int:
    path, log_path = sys.argv[1], sys.argv[2]
    if os.path.exists(path):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.bind(path)
    # Writable for the daemon's unprivileged user: connecting needs write access to the socket.
    os.chmod(path, 0o666)  # noqa: S103
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    creds_size = struct.calcsize("3i")
    with open(log_path, "a", buffering=1, encoding="utf-8") as log:
        log.write(f"receiver ready pid={os.getpid()}\n")
        while True:
            data, ancdata, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(creds_size))
            pid = "?"
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = str(struct.unpack("3i", payload[:creds_size])[0])
            text = data.decode("utf-8", "replace").strip().replace("\n", "|")
            log.write(f"pid={pid} {text}\n")


if __name__ == "__main__":
    sys.exit(main())
