"""systemd/backupwatch.service, checked by systemd's own tools (SPEC §7, §9), without booting it.

`systemd-analyze verify` exits 0 even on unknown keys, so any line on stderr is a failure.
It also checks that ExecStart=/ExecReload= name executables, and /usr/bin/backupwatchd exists
only once the package is installed. The unit is therefore verified byte for byte inside a
throw-away root (`--root=`): systemd's own units copied from this machine, the unit at
/etc/systemd/system, and /usr/bin/backupwatchd and backupwatchctl as the console scripts that
pip generated for this checkout (the same entry points the package links to /usr/bin, which
`test_exec_paths_are_what_the_package_installs` pins down). Two sanity tests prove the harness
would notice a bad key or a missing executable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "backupwatch.service"
DROPIN = REPO / "systemd" / "remote-database.conf.example"
UNIT_IN_ROOT = "/etc/systemd/system/backupwatch.service"
EXPOSURE_LIMIT = 1.5

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed (apt install systemd)"
)
SYSTEM_UNIT_DIRS = [Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")]


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"},
        check=False,
    )


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every assignment, in order (keys may repeat)."""
    section, found = "", []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key: str) -> list[str]:
    return [v for _s, k, v in directives(UNIT.read_text()) if k == key]


def _console_script(name: str) -> Path | None:
    candidate = Path(sys.prefix) / "bin" / name
    return candidate if candidate.is_file() else None


def make_root(base: Path, *, dropin: bool = False, executables: bool = True) -> Path:
    """A root in which systemd sees our unit exactly as the package installs it."""
    system_units = next((d for d in SYSTEM_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if system_units is None:
        pytest.skip("systemd's own units (sysinit.target...) are not installed")
    root = base / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    shutil.copyfile(UNIT, etc / "backupwatch.service")
    if dropin:
        (etc / "backupwatch.service.d").mkdir()
        shutil.copyfile(DROPIN, etc / "backupwatch.service.d" / "remote-database.conf")
    if executables:
        bin_dir = root / "usr/bin"
        bin_dir.mkdir(parents=True)
        for name in ("backupwatchd", "backupwatchctl"):
            target = bin_dir / name
            script = _console_script(name)
            if script is not None:
                shutil.copyfile(script, target)
            else:  # not pip-installed here: an executable at the same path, for the same check
                target.write_text(f'#!/bin/sh\nexec python3 -m backupwatch.{name} "$@"\n')
            target.chmod(0o755)
    return root


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_root(tmp_path_factory.mktemp("unit"))


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return analyze("verify", f"--root={root}", "--man=no", UNIT_IN_ROOT)


# ------------------------------------------------------------------------------- verify


def test_verify_reports_nothing(root: Path) -> None:
    result = verify(root)
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


def test_verify_with_the_remote_database_dropin(tmp_path: Path) -> None:
    result = verify(make_root(tmp_path, dropin=True))
    assert result.stderr == "", result.stderr
    assert result.returncode == 0


def test_verify_harness_sees_an_unknown_key(tmp_path: Path) -> None:
    """The root really holds the unit verify reads: a bad key in it shows up on stderr."""
    bad_root = make_root(tmp_path)
    unit = bad_root / UNIT_IN_ROOT.lstrip("/")
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nNoSuchDirective=1\n"))
    result = verify(bad_root)
    assert "NoSuchDirective" in result.stderr


def test_verify_harness_sees_a_missing_executable(tmp_path: Path) -> None:
    result = verify(make_root(tmp_path, executables=False))
    assert "/usr/bin/backupwatchd" in result.stderr
    assert "/usr/bin/backupwatchctl" in result.stderr


# ----------------------------------------------------------------------------- security

_EXPOSURE = re.compile(r"Overall exposure level for backupwatch\.service: (\d+(?:\.\d+)?)")


def exposure(result: subprocess.CompletedProcess[str]) -> float:
    match = _EXPOSURE.search(result.stdout)
    assert match is not None, result.stdout + result.stderr
    return float(match.group(1))


def test_security_threshold_and_exposure() -> None:
    """`--threshold=15` fails (exit 1) above 1.5; the figure itself is checked too."""
    result = analyze("security", "--offline=yes", "--threshold=15", str(UNIT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr
    assert exposure(result) <= EXPOSURE_LIMIT


def test_security_with_the_remote_database_dropin(tmp_path: Path) -> None:
    """Opening the IP allow list to one server must not lose the rest of the sandbox."""
    dropin_root = make_root(tmp_path, dropin=True)
    result = analyze(
        "security", "--offline=yes", "--threshold=15", f"--root={dropin_root}", UNIT_IN_ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert exposure(result) <= EXPOSURE_LIMIT


# ------------------------------------------------------------- the unit's promises, pinned


def test_service_contract() -> None:
    assert values("Type") == ["notify"]
    assert values("NotifyAccess") == ["main"]
    assert values("ExecStart") == [
        "/usr/bin/backupwatchd --config /etc/backupwatch/backupwatch.toml"
    ]
    # Through backupwatchctl, so that an invalid config makes `systemctl reload` fail (exit 1).
    assert values("ExecReload") == [
        "/usr/bin/backupwatchctl --config /etc/backupwatch/backupwatch.toml reload"
    ]
    assert values("Restart") == ["on-failure"]
    assert values("User") == ["backupwatch"]
    assert values("Group") == ["backupwatch"]
    assert values("StateDirectory") == ["backupwatch"]
    assert values("RuntimeDirectory") == ["backupwatch"]
    assert values("ConfigurationDirectory") == ["backupwatch"]
    (watchdog,) = values("WatchdogSec")
    assert watchdog
    (stop,) = values("TimeoutStopSec")
    assert int(stop.removesuffix("s")) > 10  # the daemon stops within 10 s (SPEC §7)


def test_exec_paths_are_what_the_package_installs() -> None:
    """/usr/bin/backupwatchd and backupwatchctl are the venv's console scripts of pyproject."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"backupwatchd", "backupwatchctl"} <= set(scripts)
    links = dict(
        line.split()
        for line in (REPO / "packaging/debian/links").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    rules = (REPO / "packaging/debian/rules").read_text()
    assert re.search(r"^export DH_VIRTUALENV_INSTALL_ROOT = /usr/lib$", rules, re.M)
    for name in ("backupwatchd", "backupwatchctl"):
        assert links[f"usr/lib/backupwatch/bin/{name}"] == f"usr/bin/{name}"
    for line in values("ExecStart") + values("ExecReload"):
        assert line.split()[0] in {"/usr/bin/backupwatchd", "/usr/bin/backupwatchctl"}


def test_writable_paths_cover_the_default_config() -> None:
    """SPEC §1's defaults are writable under ProtectSystem=strict, the storage roots through ONE
    ReadWritePaths= entry: each entry is its own bind mount, and link(2)/rename(2) fail with EXDEV
    across mount points, which would turn every promotion into a copy."""
    from backupwatch.config import Settings

    fields = Settings.model_fields
    deposit = PurePosixPath(str(fields["backup_storage_root"].default))
    validated = PurePosixPath(str(fields["validated_backups_base_path"].default))
    database = str(fields["database_url"].default)
    socket_path = PurePosixPath(str(fields["control_socket"].default))
    assert values("ProtectSystem") == ["strict"]
    writable = [PurePosixPath(p.lstrip("-")) for v in values("ReadWritePaths") for p in v.split()]
    common = [p for p in writable if deposit.is_relative_to(p) and validated.is_relative_to(p)]
    assert common, f"no single ReadWritePaths= entry holds both {deposit} and {validated}"
    assert database.startswith("sqlite:////var/lib/backupwatch/")
    assert values("StateDirectory") == ["backupwatch"]  # /var/lib/backupwatch
    assert socket_path.parent == PurePosixPath("/run/backupwatch")
    assert values("RuntimeDirectory") == ["backupwatch"]  # /run/backupwatch


def test_network_is_localhost_only_and_families_cover_the_daemon() -> None:
    assert values("IPAddressDeny") == ["any"]
    assert values("IPAddressAllow") == ["localhost"]
    families = set(" ".join(values("RestrictAddressFamilies")).split())
    # journald, sd_notify, the control socket, PostgreSQL (local socket or TCP)
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6"}
    dropin = directives(DROPIN.read_text())
    assert ("Service", "IPAddressAllow", "192.0.2.10") in dropin
    assert ("Unit", "After", "network-online.target") in dropin


def test_every_directive_says_why() -> None:
    """Each assignment sits in a block (lines between blank lines) that holds a comment."""
    block: list[str] = []
    missing = []
    for line in [*UNIT.read_text().splitlines(), ""]:
        if line.strip():
            block.append(line.strip())
            continue
        has_comment = any(b.startswith("#") for b in block)
        missing += [b for b in block if "=" in b and not b.startswith("#") and not has_comment]
        block = []
    assert not missing, f"directives without a comment: {missing}"
