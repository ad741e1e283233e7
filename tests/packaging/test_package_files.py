"""The files the Debian package installs, checked without building it.

sysusers.d and tmpfiles.d are applied by systemd's own tools to a throw-away root; the sysctl
values are judged by the daemon's own inotify check; the shipped config and example job file
are read by the daemon's own loaders; the man pages are rendered with warnings on; and every
lintian override carries a justification. The real build, lintian run and install/upgrade/purge
round trip are packaging/build-deb.sh and packaging/ci-package-test.sh (too slow for pytest).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from backupwatch.config import load_settings
from backupwatch.jobs import load_jobs
from backupwatch.watcher import check_inotify_limits

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
DEBIAN = PACKAGING / "debian"
SITES = 30_000
FOLDERS_PER_SITE = 5  # D, D/log, D/_archive, D/_rejected, the agent's staging folder


def _root_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("systemd-sysusers/-tmpfiles --root need root to set owners")
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


def test_sysusers_and_tmpfiles_in_a_scratch_root(tmp_path: Path) -> None:
    """The user the package creates owns the directories the package creates, with these modes."""
    _root_tools()
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(PACKAGING / "sysusers.d/backupwatch.conf")],
        check=True,
        capture_output=True,
    )
    passwd = (tmp_path / "etc/passwd").read_text()
    (entry,) = [line for line in passwd.splitlines() if line.startswith("backupwatch:")]
    _name, _x, uid, gid, _gecos, home, shell = entry.split(":")
    assert (home, shell) == ("/var/lib/backupwatch", "/usr/sbin/nologin")
    assert int(uid) < 1000, "not a system user"
    result = subprocess.run(
        [
            "systemd-tmpfiles",
            f"--root={tmp_path}",
            "--create",
            str(PACKAGING / "tmpfiles.d/backupwatch.conf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    expected = {
        "srv/backupwatch": (0, 0, 0o755),
        "srv/backupwatch/deposit": (0, int(gid), 0o751),
        "srv/backupwatch/validated": (int(uid), int(gid), 0o750),
        "var/lib/backupwatch": (int(uid), int(gid), 0o750),
    }
    for relative, (owner, group, mode) in expected.items():
        st = (tmp_path / relative).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (owner, group, mode), relative


def _sysctl() -> dict[str, int]:
    text = (PACKAGING / "sysctl.d/60-backupwatch.conf").read_text()
    pairs = re.findall(r"^\s*([a-z_.]+)\s*=\s*(\d+)\s*$", text, re.M)
    return {key: int(value) for key, value in pairs}


def test_sysctl_satisfies_the_daemons_own_inotify_check(tmp_path: Path) -> None:
    values = _sysctl()
    assert set(values) == {"fs.inotify.max_user_watches", "fs.inotify.max_queued_events"}
    proc = tmp_path / "inotify"
    proc.mkdir()
    (proc / "max_user_watches").write_text(f"{values['fs.inotify.max_user_watches']}\n")
    (proc / "max_queued_events").write_text(f"{values['fs.inotify.max_queued_events']}\n")
    assert check_inotify_limits(SITES * FOLDERS_PER_SITE, proc_dir=proc) == []


def test_sysctl_never_lowers_the_kernel_default_ceiling() -> None:
    # Since Linux 5.11 max_user_watches defaults to 1% of RAM, capped at 1048576: a big host
    # may already have that, and this file must not take it away.
    assert _sysctl()["fs.inotify.max_user_watches"] >= 1_048_576


def test_packaged_config_loads_with_every_default(tmp_path: Path) -> None:
    settings = load_settings(PACKAGING / "etc/backupwatch.toml", {})
    assert str(settings.backup_storage_root) == "/srv/backupwatch/deposit"
    assert str(settings.validated_backups_base_path) == "/srv/backupwatch/validated"
    assert settings.database_url == "sqlite:////var/lib/backupwatch/backupwatch.db"
    assert str(settings.jobs_path) == "/etc/backupwatch/jobs.d"
    assert str(settings.control_socket) == "/run/backupwatch/control.sock"


def _settings_for_jobs(tmp_path: Path, jobs: Path) -> Path:
    config = tmp_path / "backupwatch.toml"
    config.write_text(
        f'jobs_path = "{jobs}"\nbackup_storage_root = "{tmp_path}/deposit"\n'
        f'validated_backups_base_path = "{tmp_path}/validated"\n'
    )
    return config


def test_example_job_file_defines_no_job(tmp_path: Path) -> None:
    """A fresh install starts cleanly: the shipped jobs.d holds no job, and no error."""
    config = _settings_for_jobs(tmp_path, PACKAGING / "etc/jobs.d")
    assert load_jobs(load_settings(config, {})) == []


def test_example_job_file_uncommented_is_valid(tmp_path: Path) -> None:
    """What the operator gets by uncommenting the example is a valid job file."""
    lines = (PACKAGING / "etc/jobs.d/example.toml").read_text().splitlines()
    code = [line[1:] for line in lines if re.match(r"^#(\[|[a-z_]+ = )", line)]
    jobs = tmp_path / "jobs.d"
    jobs.mkdir()
    (jobs / "acme.toml").write_text("\n".join(code) + "\n")
    specs = load_jobs(load_settings(_settings_for_jobs(tmp_path, jobs), {}))
    assert sorted(spec.database_name for spec in specs) == ["crm", "sales"]


@pytest.mark.parametrize("page", ["backupwatchd.8", "backupwatchctl.8"])
def test_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("man") is None:
        pytest.skip("man not installed")
    result = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(PACKAGING / "man" / page)],
        capture_output=True,
        text=True,
        env={**os.environ, "MANROFFSEQ": "", "MANWIDTH": "80"},
        check=False,
    )
    assert result.returncode == 0
    assert result.stderr == "", result.stderr
    assert page.split(".")[0].upper() in result.stdout


def test_every_lintian_override_is_justified() -> None:
    """Each override line belongs to a block (between blank lines) that starts with comments."""
    text = (DEBIAN / "backupwatch.lintian-overrides").read_text()
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        overrides = [line for line in lines if line and not line.startswith("#")]
        if overrides:
            assert lines[0].startswith("#"), f"override without a justification: {overrides}"


def test_control_pins_debians_python_311() -> None:
    control = (DEBIAN / "control").read_text()
    assert "python3 (>= 3.11)" in control
    assert "python3 (<< 3.12)" in control
    rules = (DEBIAN / "rules").read_text()
    assert "--python=/usr/bin/python3" in rules
    assert "--with python-virtualenv,installsysusers" in rules


def test_no_debian_directory_at_the_repository_root() -> None:
    assert not (REPO / "debian").exists()


def test_installed_files_exist() -> None:
    """Every source line of debian/install, manpages and docs names a file of the checkout."""
    for name in ("install", "manpages", "docs"):
        for line in (DEBIAN / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                assert (REPO / line.split()[0]).is_file(), f"debian/{name}: {line}"


@pytest.mark.parametrize(
    "script",
    [
        "build-deb.sh",
        "ci-package-test.sh",
        "debian/postinst",
        "debian/prerm",
        "debian/postrm",
        "debian/rules",
    ],
)
def test_scripts_are_executable_and_parse(script: str) -> None:
    path = PACKAGING / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    if script == "debian/rules":
        return
    shell = "bash" if path.read_text().startswith("#!/bin/bash") else "sh"
    subprocess.run([shell, "-n", str(path)], check=True)


def test_packaged_alerts_example_uncommented_is_valid(tmp_path: Path) -> None:
    """The commented [alerts] block of the packaged config, uncommented, loads."""
    text = (PACKAGING / "etc/backupwatch.toml").read_text()
    block = text[text.index("#[alerts]") :].splitlines()
    code = [line[1:] for line in block if re.match(r'^#(\[|[a-z_]+ = |\s+")', line)]
    config = tmp_path / "backupwatch.toml"
    config.write_text("\n".join(code) + "\n")
    alerts = load_settings(config, {}).alerts
    assert sorted(alerts.channel_urls()) == ["acme-team", "default"]
    assert alerts.digest_hour_utc == 7
