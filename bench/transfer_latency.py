"""Event to verdict, per transfer tool: how long after a report is complete is it judged?

    .venv/bin/python bench/transfer_latency.py [--runs 20] [--tools rename,lftp-mv,...]

SPEC §7 promises a reaction "within a second" of a report's arrival. How the report arrives
depends on the agent's tool, and the kernel tells the daemon different things for each (issue 6,
item 4): a rename inside the folder is IN_MOVED_TO, a direct write ends with IN_CLOSE_WRITE, but
a hard link (lftp `mv` over sftp://, which OpenSSH's sftp-server performs as link + unlink) or a
rename from outside the watched tree arrives as IN_CREATE alone.

Starts the real `backupwatchd` (SQLite) and a loopback `sshd` with its own keys, then for each
tool sends `--runs` reports one at a time, each into its own site with a fresh staged file
already in place. The benchmark's own inotify observer (watchdog, all events) timestamps:

- **complete**: the last "created", "closed" (after writing) or "moved here" event on
  `D/STATUS.json` before it leaves D: the moment the report is whole on the server;
- **verdict**: the report leaving D for `D/_archive/` (after its entries are committed).

latency = verdict - complete, both read from this process's monotonic clock. Prints a
markdown table: p50 and max per tool, and which event made the report complete.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import getpass
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from common import (
    BenchDaemon,
    BenchDatabase,
    database_block,
    jobs_toml,
    machine,
    percentile,
    report_bytes,
    wait_quiet,
    workspace,
    write_config,
    write_file,
)
from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.inotify import InotifyObserver

SSHD = "/usr/sbin/sshd"
DATABASE = "db0"
ARRIVING = ("created", "closed")  # on the report's path; or a move whose destination it is
LEAVING = ("moved", "deleted")  # from the report's path: archived (or rejected)


# ------------------------------------------------------------------------------- sshd


@dataclass
class Sshd:
    process: subprocess.Popen[bytes]
    port: int
    options: list[str]
    user: str

    def remote(self, path: Path) -> str:
        return f"{self.user}@127.0.0.1:{path}"


@contextlib.contextmanager
def sshd(folder: Path) -> Iterator[Sshd]:
    """A loopback sshd with its own host key and one authorized key (see the tests'
    tests/integration/transfer.py, which documents each setting)."""
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key, key = folder / "host_ed25519", folder / "client_ed25519"
    for path in (host_key, key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {key}.pub\nStrictModes no\nUsePAM no\nPidFile none\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
        "MaxStartups 100\nSubsystem sftp internal-sftp\n"
    )
    log = (folder / "sshd.log").open("ab")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    options = [
        "-F", "/dev/null", "-o", "StrictHostKeyChecking=no",
        "-o", f"UserKnownHostsFile={folder / 'known_hosts'}", "-o", "BatchMode=yes",
        "-o", "LogLevel=ERROR", "-i", str(key),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sshd did not start; see {folder / 'sshd.log'}")
            time.sleep(0.05)
        yield Sshd(process, port, options, getpass.getuser())
    finally:
        process.terminate()
        process.wait()
        log.close()


# ------------------------------------------------------------------------------- events


class Events(FileSystemEventHandler):
    """Every created/closed/moved event under the deposit root, with its monotonic time."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()
        self.seen: list[tuple[float, str, str, str]] = []  # (time, kind, src, dest)

    def on_any_event(self, event: FileSystemEvent) -> None:
        now = time.monotonic()
        if isinstance(event, FileMovedEvent):
            kind = "moved"
        elif isinstance(event, FileDeletedEvent):
            kind = "deleted"  # also a move to a folder not yet watched
        elif isinstance(event, FileClosedEvent):
            kind = "closed"
        elif isinstance(event, FileCreatedEvent):
            kind = "created"
        else:
            return
        src, dest = os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")
        with self.cond:
            self.seen.append((now, kind, src, dest))
            self.cond.notify_all()

    def wait_left(self, path: str, timeout: float) -> tuple[float, str, str, str] | None:
        """The first event of `path` leaving its folder; call with `cond` held."""
        deadline = time.monotonic() + timeout
        while not (left := [e for e in self.seen if e[1] in LEAVING and e[2] == path]):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.cond.wait(remaining)
        return left[0]

    def set_aside(self, report: Path, where: Path) -> None:
        """Move a report that was never judged out of D, and forget its events."""
        with self.cond:
            if report.exists():
                os.rename(report, where)
                self.wait_left(str(report), 5.0)
            self.seen.clear()

    def latency(self, report: Path, timeout: float) -> tuple[float, str] | None:
        """(verdict - complete, the completing event) for `report`, once it has left D."""
        path = str(report)
        with self.cond:
            left = self.wait_left(path, timeout)
            if left is None:
                return None
            verdict, _kind, _src, dest = left
            if "/_archive/" not in dest:
                raise SystemExit(f"{path} was not archived (rejected?): {dest or 'deleted'}")
            arrivals = [
                (t, kind)
                for t, kind, src, dest in self.seen
                if t <= verdict and ((kind in ARRIVING and src == path) or dest == path)
            ]
            self.seen.clear()
        complete, kind = arrivals[-1]
        return verdict - complete, kind


# ------------------------------------------------------------------------------- tools


@dataclass
class Send:
    """One report to send: its bytes (also saved at `local`) and where it must land."""

    data: bytes
    local: Path
    target: Path
    outside: Path  # a folder on the same filesystem, not watched


def run_tool(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True)


def tools(server: Sshd, scratch: Path) -> dict[str, tuple[str, Callable[[Send], None]]]:
    """name -> (what the agent does, how to do it)."""
    port = str(server.port)
    ssh = shlex.join(["ssh", *server.options, "-p", port])

    def rename(send: Send) -> None:
        part = send.target.with_name(".STATUS.json.part")
        write_file(part, send.data)
        os.rename(part, send.target)

    def mv_outside(send: Send) -> None:
        source = send.outside / "STATUS.json"
        write_file(source, send.data)
        os.rename(source, send.target)

    def link_unlink(send: Send) -> None:
        part = send.target.with_name(".STATUS.json.part")
        write_file(part, send.data)
        os.link(part, send.target)
        os.unlink(part)

    def redirect(send: Send) -> None:
        write_file(send.target, send.data)

    def sftp_put(send: Send) -> None:
        batch = scratch / "put.sftp"
        batch.write_text(f'put "{send.local}" "{send.target}"\n')
        run_tool(
            ["sftp", *server.options, "-P", port, "-b", str(batch), f"{server.user}@127.0.0.1"]
        )

    def scp(send: Send) -> None:
        run_tool(["scp", *server.options, "-P", port, str(send.local), server.remote(send.target)])

    def rsync(send: Send) -> None:
        run_tool(["rsync", "-e", ssh, str(send.local), server.remote(send.target)])

    def lftp_mv(send: Send) -> None:
        part = send.target.with_name(".STATUS.json.part")
        connect = shlex.join(["ssh", "-a", "-x", *server.options])
        script = scratch / "mv.lftp"
        script.write_text(
            f"set sftp:connect-program {shlex.quote(connect)}\nset cmd:fail-exit yes\n"
            f"open sftp://{server.user}:@127.0.0.1:{port}\n"
            f'put "{send.local}" -o "{part}"\nmv "{part}" "{send.target}"\nbye\n'
        )
        run_tool(["lftp", "-f", str(script)])

    return {
        "rename": ("write .STATUS.json.part, rename(2) into place", rename),
        "redirect": ("open, write, close STATUS.json in place", redirect),
        "sftp-put": ("sftp put straight to STATUS.json", sftp_put),
        "scp": ("scp (SFTP protocol) to STATUS.json", scp),
        "rsync": ("rsync: temp file, rename", rsync),
        "mv-outside": ("mv from outside the watched tree (same fs)", mv_outside),
        "link-unlink": ("link(2) .part to STATUS.json, unlink .part", link_unlink),
        "lftp-mv": ("lftp put .part + mv on sftp:// (link + unlink)", lftp_mv),
    }


# ------------------------------------------------------------------------------- run


def measure(
    args: argparse.Namespace,
) -> list[tuple[str, str, list[float], collections.Counter[str]]]:
    with workspace(args.keep) as (base, run_dir):
        chosen = args.tools.split(",") if args.tools else None
        db = BenchDatabase.create("sqlite", base)
        with sshd(run_dir) as server:
            available = tools(server, run_dir)
            names = chosen or list(available)
            unknown = set(names) - set(available)
            if unknown:
                raise SystemExit(f"unknown tools {sorted(unknown)}: {', '.join(available)}")
            config = write_config(base, db.url, jobs_toml(names, [DATABASE]), run_dir / "ctl.sock")
            deposit, outside = base / "deposit", base / "outside"
            for name in names:
                for sub in ("data", "_archive", "_rejected"):  # watched before the first run
                    (deposit / f"Bench_City_{name}" / sub).mkdir(parents=True, exist_ok=True)
            outside.mkdir()
            (base / "agent").mkdir()
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start()
            assert daemon.notify is not None
            threading.Thread(target=drain, args=(daemon.notify.sock,), daemon=True).start()
            events = Events()
            observer = InotifyObserver()
            observer.schedule(events, str(deposit), recursive=True)
            observer.start()
            try:
                wait_quiet()
                return [
                    (
                        name,
                        available[name][0],
                        *sample(name, available[name][1], base, events, args),
                    )
                    for name in names
                ]
            finally:
                observer.stop()
                observer.join()
                daemon.stop()


def drain(sock: socket.socket) -> None:
    """Keep reading the daemon's notify socket, as systemd does: once 10 datagrams wait
    unread (net.unix.max_dgram_qlen), systemd-python's sd_notify blocks holding the GIL and
    the whole daemon freezes (about a minute of STATUS= updates in)."""
    while sock.fileno() != -1:
        try:
            sock.settimeout(0.2)
            sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return


def sample(
    name: str,
    send: Callable[[Send], None],
    base: Path,
    events: Events,
    args: argparse.Namespace,
) -> tuple[list[float], collections.Counter[str]]:
    folder = base / "deposit" / f"Bench_City_{name}"
    latencies: list[float] = []
    kinds: collections.Counter[str] = collections.Counter()
    for index in range(args.warmup + args.runs):
        content = os.urandom(4096)
        staged = f"data/{index:03d}.sql.gz"
        write_file(folder / staged, content)
        when = datetime.now(UTC)
        data = report_bytes(name, when, {DATABASE: database_block(staged, content, when)})
        local = base / "agent" / f"{name}-{index}.json"
        write_file(local, data)
        send(Send(data, local, folder / "STATUS.json", base / "outside"))
        result = events.latency(folder / "STATUS.json", args.timeout)
        if result is None:  # counted as never judged (the periodic rescan would find it)
            print(f"{name}: report {index} not archived within {args.timeout} s", file=sys.stderr)
            kinds["never judged"] += 1
            aside = base / "agent" / f"{name}-{index}-never-judged.json"
            events.set_aside(folder / "STATUS.json", aside)  # so that the next run can land
            continue
        if index >= args.warmup:
            latencies.append(result[0] * 1000)
            kinds[result[1]] += 1
    return latencies, kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2, help="runs per tool not counted")
    parser.add_argument("--tools", default="", help="comma-separated (default: all)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per report, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work tree and daemon log")
    args = parser.parse_args()
    missing = [t for t in ("ssh", "sftp", "scp", "rsync", "lftp") if not shutil.which(t)]
    if missing or not os.access(SSHD, os.X_OK):
        raise SystemExit(f"needs {SSHD} and {missing}: apt-get install openssh-server "
                         "openssh-client rsync lftp")  # fmt: skip
    started = time.monotonic()
    results = measure(args)
    print(f"<!-- {machine()} -->")
    print("| tool | what lands on the server | report complete on | runs | p50 | max |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, what, latencies, kinds in results:
        kind = ", ".join(f"{k} x{n}" if len(kinds) > 1 else k for k, n in kinds.most_common())
        worst = max(latencies, default=float("nan"))
        print(
            f"| {name} | {what} | {kind} | {len(latencies)} "
            f"| {percentile(latencies, 50):.0f} ms | {worst:.0f} ms |"
        )
    print(f"wall {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
