"""Real transfer tools against the real daemon: a loopback OpenSSH server, its clients, and
what an operator sees afterwards (entries, `_archive/`, `_rejected/`, reason files, the log).

Agents do not write reports the way the test suite's `drop()` does. They use sftp, scp, rsync,
lftp, shell redirections and editors, over slow links, with their own umask; each tool has its
own order of open, write, close, chmod, rename and link (see `tests/integration/
test_transfer_tools.py` for which tool does what). Everything here runs for real: `sshd` listens on
127.0.0.1 with its own host key, accepts one key that this module generates, and serves SFTP
with `internal-sftp`, which performs an SFTP rename as link(2) + unlink(2).

Without the tools the tests skip (locally) or fail (CI=true) with the apt line to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from daemonkit import Daemon
from support import database, job_block, report

APT_LINE = "apt-get install -y openssh-server openssh-client rsync lftp"
SSHD = "/usr/sbin/sshd"
CLIENTS = ("ssh", "sftp", "scp", "ssh-keygen", "rsync", "lftp")

COMPANY, CITY, DATABASE = "Xfer", "Lyon", "sales"
STAGED = "database/sales.sql.gz"
SLOW_LINK = Path(__file__).with_name("slow_link.py")


# ------------------------------------------------------------------------------ tools


def missing_tools() -> list[str]:
    """The transfer tools this machine lacks."""
    absent = [name for name in CLIENTS if shutil.which(name) is None]
    if not os.access(SSHD, os.X_OK):
        absent.insert(0, SSHD)
    return absent


def skip_or_fail(reason: str) -> None:
    """Skip with the reason; under CI=true a missing tool is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the transfer-tool tests: {APT_LINE})")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run(command: Sequence[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, check=False, **kwargs
    )


# ------------------------------------------------------------------------------ sshd


@dataclass
class SshServer:
    """A running `sshd -D -e` on a loopback port and what its clients need to log in."""

    folder: Path
    port: int
    key: Path
    known_hosts: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    user: str = field(default_factory=getpass.getuser)
    uplink: int | None = None  # bytes/s from client to server (slow_link.py); None: loopback

    def slow_uplink(self, bytes_per_s: int) -> SshServer:
        """The same server reached over a slow uplink (see slow_link.py)."""
        return dataclasses.replace(self, uplink=bytes_per_s)

    def options(self) -> list[str]:
        """Client options: no user or system config, this key, a private known_hosts."""
        proxy = []
        if self.uplink is not None:
            command = [sys.executable, str(SLOW_LINK), str(self.uplink), "%h", "%p"]
            proxy = ["-o", f"ProxyCommand={shlex.join(command)}"]
        return [
            *proxy,
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.key),
        ]

    def remote(self, path: Path | str) -> str:
        return f"{self.user}@127.0.0.1:{path}"

    def ssh_command(self) -> list[str]:
        return ["ssh", *self.options(), "-p", str(self.port)]

    def ssh(self, command: str, stdin: Path | None = None) -> subprocess.Popen[bytes]:
        """`command` run by the login shell on the server (stdin from a local file)."""
        argv = [*self.ssh_command(), f"{self.user}@127.0.0.1", command]
        if stdin is None:
            return _popen(argv, stdin=subprocess.DEVNULL)
        with stdin.open("rb") as source:
            return _popen(argv, stdin=source)

    def sftp(
        self, batch: str, *, limit_kbit: int | None = None, buffer: int | None = None
    ) -> subprocess.Popen[bytes]:
        """`sftp -b BATCH`; `-l` limits Kbit/s, `-B` the request size.

        Over loopback a 32 KiB request is written at once whatever `-l` says (sftp sleeps
        after sending it); `buffer=1024` makes a slow link write the file 1 KiB at a time.
        """
        extra = [] if limit_kbit is None else ["-l", str(limit_kbit)]
        extra += [] if buffer is None else ["-B", str(buffer)]
        batch_path = self.folder / f"batch-{time.monotonic_ns()}.sftp"
        batch_path.write_text(batch)
        command = ["sftp", *self.options(), "-P", str(self.port), *extra, "-b", str(batch_path)]
        return _popen([*command, f"{self.user}@127.0.0.1"])

    def scp(
        self, source: Path, target: Path, *, legacy: bool = False, limit_kbit: int | None = None
    ) -> subprocess.Popen[bytes]:
        """OpenSSH 9 `scp` speaks SFTP; `legacy` (-O) is the old scp protocol (`scp -t`)."""
        extra = (["-O"] if legacy else []) + ([] if limit_kbit is None else ["-l", str(limit_kbit)])
        command = ["scp", *self.options(), "-P", str(self.port), *extra]
        return _popen([*command, str(source), self.remote(target)])

    def rsync(self, *args: str | Path) -> subprocess.Popen[bytes]:
        """`rsync -e ssh …`: the last argument is usually `self.remote(...)`."""
        return _popen(["rsync", "-e", shlex.join(self.ssh_command()), *map(str, args)])

    def lftp(self, *commands: str) -> subprocess.Popen[bytes]:
        """lftp on sftp://, logged in with this key (lftp runs `ssh` itself)."""
        connect = shlex.join(["ssh", "-a", "-x", *self.options()])
        script = [
            f"set sftp:connect-program {shlex.quote(connect)}",
            "set net:max-retries 1",
            "set cmd:fail-exit yes",
            f"open sftp://{self.user}:@127.0.0.1:{self.port}",
            *commands,
            "bye",
        ]
        script_path = self.folder / f"lftp-{time.monotonic_ns()}.lftp"
        script_path.write_text("\n".join(script) + "\n")
        return _popen(["lftp", "-f", str(script_path)])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _popen(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


SSHD_CONFIG = """\
# A loopback test server: its own host key, one authorized key, nothing from /etc/ssh.
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {authorized}
# the key files live in pytest's tmp folders, whose modes sshd would otherwise refuse
StrictModes no
UsePAM no
PidFile none
# root may log in with a key: the default (prohibit-password), spelled out; no password login
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
PrintMotd no
PrintLastLog no
# several transfers start at once: never drop a connection that is still authenticating
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
Subsystem sftp internal-sftp
"""


@contextlib.contextmanager
def running_sshd(folder: Path) -> Iterator[SshServer]:
    """Start `sshd -D -e -f CONFIG` on a free loopback port; skip (fail in CI) without it."""
    absent = missing_tools()
    if absent:
        skip_or_fail(f"transfer tools not installed: {', '.join(absent)}")
    if os.geteuid() == 0:
        # sshd's privilege-separation folder; the package's tmpfiles.d makes it under systemd
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key, key = folder / "host_ed25519", folder / "client_ed25519"
    for path in (host_key, key):
        _keygen(path)
    for _attempt in range(3):  # another process may take the free port before sshd binds it
        server = _start_sshd(folder, host_key, key, free_port())
        if server is not None:
            break
    else:
        pytest.fail(f"sshd would not start; see {folder / 'sshd.log'}")
    try:
        _check_login(server)
        yield server
    finally:
        server.stop()


def _keygen(path: Path) -> None:
    result = run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "backupwatch-test", "-f", path]
    )
    if result.returncode != 0:
        pytest.fail(f"ssh-keygen failed: {result.stderr}")


def _start_sshd(folder: Path, host_key: Path, key: Path, port: int) -> SshServer | None:
    config = folder / "sshd_config"
    text = SSHD_CONFIG.format(port=port, host_key=host_key, authorized=f"{key}.pub")
    config.write_text(text)
    check = run([SSHD, "-t", "-f", config])
    if check.returncode != 0:
        skip_or_fail(f"`sshd -t` refuses the test config: {check.stderr.strip()}")
    log_path = folder / "sshd.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    known_hosts = folder / "known_hosts"
    server = SshServer(folder, port, key, known_hosts, process, log_path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return server
        time.sleep(0.05)
    server.stop()
    return None


def _check_login(server: SshServer) -> None:
    login = server.ssh("true")
    _out, err = login.communicate(timeout=30)
    if login.returncode != 0:
        log = server.log_path.read_text(errors="replace")[-2000:]
        pytest.fail(f"cannot log in to the test sshd: {err.decode()}\nsshd log:\n{log}")


# ------------------------------------------------------------------------------ transfers


@dataclass
class Transfer:
    """One running client; `finish` waits for it and fails the test if it failed."""

    name: str
    process: subprocess.Popen[bytes]
    background: bool = False  # a writer that holds its file open until the test kills it
    output: str | None = None

    def finish(self, timeout: float = 60.0) -> str:
        if self.output is not None:
            return self.output
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
            pytest.fail(f"{self.name}: still running after {timeout} s: {err.decode()}")
        if self.process.returncode != 0:
            pytest.fail(
                f"{self.name}: exit {self.process.returncode}: {err.decode()} {out.decode()}"
            )
        self.output = out.decode() + err.decode()
        return self.output


class Transfers:
    """The clients a test has started; all of them are killed (by pid) when the test ends."""

    def __init__(self) -> None:
        self.started: list[Transfer] = []

    def start(
        self, name: str, process: subprocess.Popen[bytes], background: bool = False
    ) -> Transfer:
        transfer = Transfer(name, process, background)
        self.started.append(transfer)
        return transfer

    def finish_all(self, timeout: float = 60.0) -> None:
        for transfer in self.started:
            if not transfer.background:
                transfer.finish(timeout)

    def kill_all(self) -> None:
        for transfer in self.started:
            if transfer.process.poll() is None:
                transfer.process.kill()
                transfer.process.wait()


@contextlib.contextmanager
def transfers() -> Iterator[Transfers]:
    running = Transfers()
    try:
        yield running
    finally:
        running.kill_all()


def shell(script: str) -> subprocess.Popen[bytes]:
    """A writer that is a plain shell script (redirections, `sleep`)."""
    return _popen(["bash", "-c", script])


def pausing_writer(
    source: Path, target: Path, split: int, pause: float, *, then: str = "", rest: str = ""
) -> subprocess.Popen[bytes]:
    """`{ head -c SPLIT SOURCE; sleep PAUSE; THEN; tail -c +SPLIT+1 SOURCE; } > TARGET`: one
    open of TARGET, held through the pause; `rest` replaces the tail (a broken ending)."""
    tail = rest or f'tail -c +{split + 1} "{source}"'
    middle = f"{then}; " if then else ""
    return shell(f'{{ head -c {split} "{source}"; sleep {pause}; {middle}{tail}; }} > "{target}"')


def still_there(target: Path, marker: Path) -> str:
    """Shell: record in MARKER whether TARGET is still where its writer put it (not judged)."""
    return f'if [ -e "{target}" ]; then echo present > "{marker}"; else echo gone > "{marker}"; fi'


# ------------------------------------------------------------------------------ sites


@dataclass(frozen=True)
class Site:
    """One agent's deposit folder with one HOURLY job (`sales`, ±30 min: any time is relevant)."""

    deposit_root: Path
    neighborhood: str

    @property
    def agent_id(self) -> str:
        return f"{COMPANY}_{CITY}_{self.neighborhood}"

    @property
    def folder(self) -> Path:
        return self.deposit_root / self.agent_id

    @property
    def label(self) -> str:
        return f"{COMPANY}/{CITY}/{self.neighborhood}/{DATABASE}"

    def job(self) -> str:
        return job_block(
            COMPANY,
            CITY,
            self.neighborhood,
            DATABASE,
            frequency="HOURLY",
            expected_hour_utc=None,
            collection_window_minutes=30,
        )

    def report(self, content: bytes, staged: str = STAGED, size: int = 0, **kw: Any) -> bytes:
        """A report describing `content` as the staged file, padded (logs_summary) to `size`."""
        when = datetime.now(UTC).replace(microsecond=0)
        block = database(staged, content, **kw)
        body = report(self.agent_id, when, {DATABASE: block})
        missing = size - len(json.dumps(body).encode())
        if missing > 0:
            block["logs_summary"] = "ok " + "." * missing
        return json.dumps(body).encode()


def jobs_for(sites: Sequence[Site]) -> str:
    return "".join(site.job() for site in sites)


def make_sites(deposit_root: Path, *neighborhoods: str) -> list[Site]:
    return [Site(deposit_root, name) for name in neighborhoods]


def local_file(folder: Path, name: str, data: bytes, mode: int = 0o644) -> Path:
    """A source file outside the deposit tree, as the agent has it before sending it."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


# ------------------------------------------------------------------------------ what operators see


@dataclass
class Seen:
    """One site's visible state: entries (history --json), archived and rejected reports."""

    entries: list[dict[str, Any]]
    archived: list[str]
    rejected: dict[str, str]  # report name -> its reason file's text
    waiting: list[str]  # reports still in D

    @property
    def statuses(self) -> list[str]:
        return [entry["status"] for entry in self.entries]

    def describe(self) -> str:
        entries = [f"{e['status']} ({e['message']})" for e in self.entries]
        return (
            f"entries={entries or 'none'}, archived={self.archived or 'none'}, "
            f"rejected={self.rejected or 'none'}, still in D={self.waiting or 'none'}"
        )


def observe(daemon: Daemon, site: Site, entries: bool = True) -> Seen:
    """The site as an operator sees it; without `entries`, the files only (no ctl call)."""
    folder = site.folder

    def names(sub: str) -> list[str]:
        path = folder / sub
        found = path.iterdir() if path.is_dir() else iter(())
        return sorted(p.name for p in found if p.name.endswith(".json"))

    rejected = {
        name: _read(folder / "_rejected" / f"{name}.reason.txt") for name in names("_rejected")
    }
    waiting = names(".") if folder.is_dir() else []
    history = daemon.history(site.label) if entries else []
    return Seen(history, names("_archive"), rejected, waiting)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError as exc:
        return f"<no reason file: {exc.strerror}>"


@dataclass
class Expect:
    """What the operator must see for one site once its verdict is in."""

    site: Site
    status: str | None  # an entry status, or None: the report is rejected
    # each group: at least one of its words in the entry message / reason file (case-insensitive)
    words: tuple[tuple[str, ...], ...] = ()
    scenario: str = ""

    def finished(self, seen: Seen) -> bool:
        """Some verdict is visible, right or wrong: the report has left D for `_archive/`
        (after its entries were committed) or `_rejected/`."""
        return bool(seen.rejected or seen.archived)

    def problems(self, seen: Seen) -> list[str]:
        found: list[str] = []
        if self.status is None:
            text = " ".join(seen.rejected.values())
            if not seen.rejected or seen.entries or seen.archived:
                found.append("expected the report rejected (no entry)")
        else:
            text = " ".join(e["message"] or "" for e in seen.entries)
            if seen.statuses != [self.status] or seen.rejected or not seen.archived:
                found.append(f"expected one {self.status} entry and the report archived")
        for group in self.words:
            if not any(word.lower() in text.lower() for word in group):
                found.append(f"expected the {'reason' if self.status is None else 'message'} "
                             f"to mention {' or '.join(map(repr, group))}")  # fmt: skip
        return found


def await_verdicts(
    daemon: Daemon, expectations: Sequence[Expect], timeout: float
) -> dict[str, Seen]:
    """Poll until every site shows a verdict or `timeout` passes; never fails by itself, so
    that one report per site can say what it expected and what it got."""
    process = daemon.process
    assert process is not None
    deadline = time.monotonic() + timeout
    while True:
        files = [observe(daemon, e.site, entries=False) for e in expectations]
        done = all(e.finished(seen) for e, seen in zip(expectations, files, strict=True))
        if done or time.monotonic() > deadline or process.poll() is not None:
            return {e.site.neighborhood: observe(daemon, e.site) for e in expectations}
        time.sleep(0.1)


def verdict_problems(expectations: Sequence[Expect], seen: dict[str, Seen]) -> list[str]:
    """One line per site that is not as expected: the scenario, what was expected, what is."""
    lines = []
    for expect in expectations:
        got = seen[expect.site.neighborhood]
        found = expect.problems(got)
        if found:
            lines.append(
                f"[{expect.site.neighborhood}] {expect.scenario}: {'; '.join(found)}; "
                f"got {got.describe()}"
            )
    return lines


def log_problems(daemon: Daemon) -> list[str]:
    """Tracebacks and errors in the daemon's log: bad agent input must never produce them."""
    lines = []
    for record in daemon.logs():
        if "exception" in record or record.get("level") in ("error", "critical"):
            detail = str(record.get("exception", "")).strip().splitlines()[-1:]
            lines.append(
                f"daemon log: {record.get('level')} {record.get('event')} "
                f"report={record.get('report')} {' '.join(detail)}"
            )
    return lines


def assert_no_problems(problems: list[str]) -> None:
    assert not problems, "\n" + "\n".join(problems)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """A deadline-poll for a transfer's own progress (a temp file appearing, and so on)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return value


def start_daemon(daemon: Daemon, as_user: list[str] | None = None, timeout: float = 60.0) -> None:
    """Start it and wait for READY=1, failing at once with its log if it exits instead (a
    config key it does not know yet, say), rather than after the notify timeout. Then keep
    reading its notify socket, as systemd does (see `drain_notify`)."""
    daemon.start(wait_ready=False, as_user=as_user)
    notify, process = daemon.notify, daemon.process
    assert notify is not None
    assert process is not None
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(pytest.fail.Exception):
            notify.expect("READY=1", timeout=0.2)
            break
        if process.poll() is not None:
            log = daemon.log_path.read_text(errors="replace").strip()[-1500:]
            pytest.fail(f"backupwatchd exited {process.returncode} before READY=1:\n{log}")
        if time.monotonic() > deadline:
            pytest.fail(f"no READY=1 from backupwatchd within {timeout} s")
    threading.Thread(target=drain_notify, args=(notify.sock,), daemon=True).start()


def drain_notify(sock: socket.socket) -> None:
    """Read and drop the daemon's notifications until the test closes the socket.

    The kernel queues at most net.unix.max_dgram_qlen (10) datagrams; once they are not read,
    sd_notify blocks, and systemd-python's notify() blocks holding the GIL: the whole daemon
    freezes (about a minute of STATUS= updates in). systemd always reads; so does this.
    """
    while sock.fileno() != -1:
        try:
            sock.settimeout(0.2)
            sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return
