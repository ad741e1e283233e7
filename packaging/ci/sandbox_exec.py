#!/usr/bin/python3
"""Exec a command under the parts of a unit's sandbox that a process can apply to itself.

    sandbox_exec.py --unit backupwatch.service --syscall-groups GROUPS -- COMMAND [ARG...]

packaging/ci-package-test.sh cannot boot systemd, so it runs the installed daemon (and
`backupwatchctl reload`, as ExecReload= would) through this, after `setpriv` has dropped to the
service user with no new privileges and no capabilities. Read from the unit file itself:

- MemoryDenyWriteExecute=yes: the kernel's PR_SET_MDWE (Linux 6.3+), which refuses the same
  writable-and-executable mappings as systemd's seccomp rule and survives execve;
- SystemCallFilter= (merged as systemd does: the first allow list plus @default, then `~` lines
  remove), SystemCallErrorNumber= and SystemCallArchitectures=native: a seccomp allow list
  (python3-seccomp), built from GROUPS, the output of `systemd-analyze syscall-filter`, i.e.
  systemd's own definitions of @system-service, @privileged...

What cannot be applied here is reported on stderr and skipped, never silently: the caller decides.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
from pathlib import Path

PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def say(message: str) -> None:
    print(f"sandbox_exec: {message}", file=sys.stderr, flush=True)


def unit_values(unit: Path, key: str) -> list[str]:
    found = []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if line.startswith(f"{key}="):
            found.append(line.partition("=")[2].strip())
    return found


def read_groups(path: Path) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in path.read_text().splitlines():
        if raw.startswith("@"):
            current = groups.setdefault(raw.strip(), [])
        elif raw.startswith("    ") and current is not None:
            item = raw.strip()
            if item and not item.startswith("#"):
                current.append(item)
        else:
            current = None
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        if name.startswith("@"):
            if name not in groups:
                raise SystemExit(f"sandbox_exec: unknown syscall group {name}")
            result |= expand(groups[name], groups)
        else:
            result.add(name.partition(":")[0])
    return result


def syscall_allow_list(unit: Path, groups: dict[str, list[str]]) -> set[str] | None:
    """systemd.exec(5): the first SystemCallFilter= decides allow or deny mode; later ones add
    to an allow list, or remove from it when they start with ~. None when there is no filter."""
    allowed: set[str] | None = None
    for value in unit_values(unit, "SystemCallFilter"):
        if not value:
            allowed = None
            continue
        invert = value.startswith("~")
        names = expand(value.lstrip("~").split(), groups)
        if allowed is None:
            if invert:
                raise SystemExit("sandbox_exec: deny-list filters are not emulated")
            allowed = names | expand(["@default"], groups)
        elif invert:
            allowed -= names
        else:
            allowed |= names
    return allowed


def apply_mdwe(unit: Path) -> None:
    if unit_values(unit, "MemoryDenyWriteExecute") != ["yes"]:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        say(f"PR_SET_MDWE unavailable (errno {ctypes.get_errno()}): no memory-deny-write-execute")
    else:
        say("MemoryDenyWriteExecute: on (PR_SET_MDWE)")


def apply_syscall_filter(unit: Path, groups_file: Path) -> None:
    allowed = syscall_allow_list(unit, read_groups(groups_file))
    if allowed is None:
        return
    try:
        import seccomp  # python3-seccomp
    except ImportError:
        say("python3-seccomp not installed: SystemCallFilter= not applied")
        return
    (error_name,) = unit_values(unit, "SystemCallErrorNumber") or ["EPERM"]
    action = seccomp.ERRNO(getattr(errno, error_name))
    arch = unit_values(unit, "SystemCallArchitectures")
    if arch not in ([], ["native"]):
        raise SystemExit(f"sandbox_exec: SystemCallArchitectures={arch} not emulated")
    filt = seccomp.SyscallFilter(defaction=action)  # native architecture only
    count = 0
    for name in sorted(allowed):
        try:
            filt.add_rule(seccomp.ALLOW, name)
            count += 1
        except (RuntimeError, ValueError):
            pass  # a syscall this architecture does not have (e.g. the *_time64 ones on x86_64)
    filt.load()
    say(f"SystemCallFilter: {count} system calls allowed, any other fails with {error_name}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--unit", type=Path, required=True)
    parser.add_argument("--syscall-groups", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command")
    apply_mdwe(args.unit)
    apply_syscall_filter(args.unit, args.syscall_groups)
    os.execv(command[0], command)  # noqa: S606 (exec is the point: the sandbox survives it)
    return 127


if __name__ == "__main__":
    sys.exit(main())
