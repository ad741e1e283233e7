#!/bin/bash
# CI: the Debian package's whole life on this machine, without booting systemd.
#
#   sudo packaging/ci-package-test.sh
#
#  1. build dist/backupwatch_<v>_<arch>.deb and a rebuild <v>+ci1 (packaging/build-deb.sh; lintian
#     errors fail the build)
#  2. install it with apt, check what it installed (user, directories, modes, conffiles, unit,
#     man pages, version) and verify the installed unit with systemd-analyze
#  3. run the installed /usr/bin/backupwatchd as user backupwatch, in the foreground, on a
#     temporary tree, the way the unit would: no new privileges, no capabilities, the whole file
#     system read-only but its tree (ProtectSystem=strict + ReadWritePaths, in a private mount
#     namespace), the unit's SystemCallFilter= as a seccomp filter and MemoryDenyWriteExecute=
#     (kernel PR_SET_MDWE), NOTIFY_SOCKET and WATCHDOG_USEC bound to a receiver here; wait for READY=1, have an agent account drop one report and its
#     staged file, wait for the verdict (backupwatchctl history --json), check the hard-link
#     promotion, backupwatchctl status, reload (valid and invalid: exit 1), then SIGTERM
#  4. run it once more with the packaged configuration (the real /etc, /srv, /var/lib paths)
#     and query it as root, as the operator's README says
#  5. edit the conffile, add a job file, upgrade to the +ci1 rebuild with dpkg -i: the edit, the
#     job file and the database (byte for byte) survive; the daemon starts again on them
#  6. dpkg -r (program gone, configuration and database kept), dpkg --purge (configuration and
#     state gone), and nothing left behind: the file lists of /etc /usr /lib /srv /var/lib /opt
#     before and after are compared
#
# It never starts systemd or talks to it (no systemctl start, no systemd-nspawn, no
# systemd --user): the systemd contract is exercised through its protocols (sd_notify datagrams,
# the watchdog variables) and systemd-analyze. Every step prints "=== STEP n: ..." and a failure
# names its step. Needs root, Debian 12, and network (or a pip mirror) for the build.
#
# Environment:
#   BACKUPWATCH_CI_DEB, BACKUPWATCH_CI_DEB_UPGRADE   use these .deb files instead of building
#   BACKUPWATCH_CI_KEEP=1                            keep the temporary tree (path printed)
#   BACKUPWATCH_CI_SNAPSHOT_PRUNE="/var/lib/foo ..." more busy paths to leave out of the
#                                                    before/after file-list comparison
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LC_ALL=C.UTF-8
unset VIRTUAL_ENV PYTHONHOME PYTHONPATH NOTIFY_SOCKET WATCHDOG_USEC WATCHDOG_PID BACKUPWATCH_CONFIG
export DEBIAN_FRONTEND=noninteractive

AGENT=bwci-agent                    # a stand-in for one agent's upload account
SITE=ACME_Lyon_Part-Dieu
JOB=ACME/Lyon/Part-Dieu/sales
UPGRADE_SUFFIX=+ci1
SNAPSHOT_ROOTS=(/etc /usr /lib /srv /var/lib /opt)

STEP="(start)"
T=""
DAEMON_PID=""
RECEIVER_PID=""
CREATED_AGENT=0
CREATED_RUNDIR=0

step() {
	STEP=$1
	printf '\n=== STEP %s\n' "$STEP"
}
ok() { printf '  ok: %s\n' "$*"; }
fail() {
	printf '\nFAIL [%s]: %s\n' "$STEP" "$*" >&2
	exit 1
}

cleanup() {
	local status=$?
	set +e
	if [ -n "$DAEMON_PID" ] && kill -0 "$DAEMON_PID" 2>/dev/null; then
		kill -TERM "$DAEMON_PID"
		sleep 2
		kill -KILL "$DAEMON_PID" 2>/dev/null
	fi
	[ -n "$RECEIVER_PID" ] && kill -TERM "$RECEIVER_PID" 2>/dev/null
	[ "$CREATED_RUNDIR" = 1 ] && rm -rf /run/backupwatch
	[ "$CREATED_AGENT" = 1 ] && userdel "$AGENT" 2>/dev/null
	if [ "$status" -ne 0 ]; then
		printf '\n*** ci-package-test.sh FAILED in step: %s (exit %s)\n' "$STEP" "$status" >&2
		if [ -n "$T" ]; then
			for f in "$T"/daemon-*.log "$T"/notify.log; do
				[ -f "$f" ] || continue
				printf '\n--- last lines of %s\n' "$f" >&2
				tail -n 40 "$f" >&2
			done
		fi
		if dpkg-query -W -f='${db:Status-Status}' backupwatch 2>/dev/null | grep -q .; then
			echo "(the backupwatch package is left as it is for inspection: dpkg --purge backupwatch)" >&2
		fi
	fi
	if [ -n "$T" ]; then
		if [ "${BACKUPWATCH_CI_KEEP:-0}" = 1 ] || [ "$status" -ne 0 ]; then
			echo "temporary tree kept: $T" >&2
		else
			rm -rf "$T"
		fi
	fi
	exit "$status"
}
trap cleanup EXIT

# Not compared: dpkg's and apt's own databases, and the data of other services that may be
# running on the CI machine (their files come and go by themselves).
SNAPSHOT_PRUNE=(
	/var/lib/dpkg /var/lib/apt /var/lib/ucf /var/lib/man-db /var/lib/logrotate /var/lib/PackageKit
	/var/lib/postgresql /var/lib/mysql /var/lib/redis /var/lib/rabbitmq /var/lib/mosquitto
	/var/lib/nats-server /var/lib/docker /var/lib/containerd
	${BACKUPWATCH_CI_SNAPSHOT_PRUNE:-}
)
snapshot() {
	local prune=() p
	for p in "${SNAPSHOT_PRUNE[@]}"; do prune+=(-path "$p" -o); done
	find "${SNAPSHOT_ROOTS[@]}" -xdev \( "${prune[@]}" -false \) -prune -o -print 2>/dev/null \
		| LC_ALL=C sort
}

# The unit's sandbox, as far as it can be had without systemd, around COMMAND: a private mount
# namespace where everything is read-only but the given paths (ProtectSystem=strict with
# ReadWritePaths=/StateDirectory=/RuntimeDirectory=), then user and group backupwatch with no
# new privileges and no capabilities (User=, NoNewPrivileges=, CapabilityBoundingSet=), then
# what packaging/ci/sandbox_exec.py reads from the installed unit: SystemCallFilter= (seccomp)
# and MemoryDenyWriteExecute= (PR_SET_MDWE).
#   sandboxed "RW_PATH ..." COMMAND...
# Every program in the chain execs the next one, so the daemon keeps the pid of `unshare`.
UNIT_FILE=/lib/systemd/system/backupwatch.service
sandbox_prefix() {
	SANDBOX=(unshare --mount --propagation private -- /bin/sh "$T/sandbox.sh" "$1"
		setpriv --reuid=backupwatch --regid=backupwatch --init-groups --nnp
		--bounding-set=-all --inh-caps=-all --
		/usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8)
	SELF_SANDBOX=(/usr/bin/python3 "$T/sandbox_exec.py" --unit "$UNIT_FILE"
		--syscall-groups "$T/syscall-groups.txt" --)
}
sandboxed() {
	sandbox_prefix "$1"
	shift
	"${SANDBOX[@]}" "${SELF_SANDBOX[@]}" "$@"
}

write_sandbox_helper() {
	cat >"$T/sandbox.sh" <<'EOF'
#!/bin/sh
# sandbox.sh "RW_PATH ..." COMMAND...: run inside `unshare --mount --propagation private`.
set -e
rw=$1
shift
for p in $rw; do mount --bind "$p" "$p"; done
findmnt -rn -o TARGET | while read -r m; do
	case " $rw " in *" $m "*) continue ;; esac
	case "$m" in /proc | /proc/* | /sys | /sys/* | /dev | /dev/*) continue ;; esac
	mount -o remount,bind,ro "$m" 2>/dev/null || true
done
exec "$@"
EOF
	install -m 0755 "$REPO/packaging/ci/notify_receiver.py" "$T/notify_receiver.py"
	install -m 0755 "$REPO/packaging/ci/sandbox_exec.py" "$T/sandbox_exec.py"
	# systemd's own definitions of @system-service, @privileged... for sandbox_exec.py
	systemd-analyze syscall-filter >"$T/syscall-groups.txt" 2>/dev/null
}

# start_daemon LABEL CONFIG "RW_PATHS": the installed daemon, sandboxed, in the background.
start_daemon() {
	local label=$1 config=$2 rw=$3
	: >"$T/daemon-$label.log"
	sandbox_prefix "$rw"
	(exec "${SANDBOX[@]}" NOTIFY_SOCKET="$T/notify.sock" WATCHDOG_USEC=4000000 \
		"${SELF_SANDBOX[@]}" /usr/bin/backupwatchd --config "$config") \
		>>"$T/daemon-$label.log" 2>&1 &
	DAEMON_PID=$!
	ok "backupwatchd started (pid $DAEMON_PID), log $T/daemon-$label.log"
}

# wait_ready LABEL: READY=1 from the daemon's own pid, within 90 s.
wait_ready() {
	local label=$1 i
	for i in $(seq 1 180); do
		if grep -q "^pid=$DAEMON_PID READY=1" "$T/notify.log"; then
			ok "READY=1 from pid $DAEMON_PID after ~$((i / 2)) s"
			grep "^pid=$DAEMON_PID .*STATUS=" "$T/notify.log" | tail -n 1 | sed 's/^/  /'
			return 0
		fi
		if ! kill -0 "$DAEMON_PID" 2>/dev/null; then
			fail "backupwatchd ($label) exited before READY=1 (see $T/daemon-$label.log)"
		fi
		sleep 0.5
	done
	fail "no READY=1 from backupwatchd ($label) within 90 s"
}

# stop_daemon LABEL: SIGTERM, then exit 0 within 10 s (SPEC §7) and STOPPING=1.
stop_daemon() {
	local label=$1 i status
	kill -TERM "$DAEMON_PID"
	for i in $(seq 1 24); do
		kill -0 "$DAEMON_PID" 2>/dev/null || break
		sleep 0.5
	done
	kill -0 "$DAEMON_PID" 2>/dev/null && fail "backupwatchd ($label) still running 12 s after SIGTERM"
	set +e
	wait "$DAEMON_PID"
	status=$?
	set -e
	[ "$status" -eq 0 ] || fail "backupwatchd ($label) exited with status $status after SIGTERM"
	grep -q "^pid=$DAEMON_PID STOPPING=1" "$T/notify.log" \
		|| fail "no STOPPING=1 from backupwatchd ($label)"
	ok "stopped on SIGTERM within 12 s, exit 0, STOPPING=1 sent"
	DAEMON_PID=""
}

# as_backupwatch COMMAND...: backupwatchctl the way ExecReload runs it (user, no privileges).
as_backupwatch() {
	setpriv --reuid=backupwatch --regid=backupwatch --init-groups --nnp \
		--bounding-set=-all --inh-caps=-all -- /usr/bin/env -i PATH=/usr/bin:/bin LANG=C.UTF-8 "$@"
}

as_agent() {
	setpriv --reuid="$AGENT" --regid="$AGENT" --init-groups -- /bin/sh -c "umask 022; $1"
}

json_get() { # json_get FILE PYTHON-EXPRESSION-ON-d
	/usr/bin/python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"
}

# ---------------------------------------------------------------------------------------------
step "0: preflight"
[ "$(id -u)" -eq 0 ] || fail "run as root (it installs and purges the package)"
. /etc/os-release
[ "${ID:-}" = debian ] || echo "  warning: not Debian (${PRETTY_NAME:-unknown})"
if dpkg-query -W -f='${db:Status-Status}' backupwatch 2>/dev/null | grep -qv '^not-installed$'; then
	fail "backupwatch is already installed or has config files left: this test needs a machine without it (dpkg --purge backupwatch, if that is really what you want)"
fi
for f in /srv/backupwatch /var/lib/backupwatch /etc/backupwatch; do
	[ ! -e "$f" ] || fail "$f exists already: this test needs a machine without backupwatch"
done
T=$(mktemp -d /tmp/backupwatch-ci.XXXXXX)
chmod 0755 "$T"
write_sandbox_helper
PYPROJECT_VERSION=$(/usr/bin/python3 "$REPO/packaging/debian_changelog.py" --print-version --suffix "")
ok "version $PYPROJECT_VERSION, temporary tree $T"

# ---------------------------------------------------------------------------------------------
step "1: build the package and its +ci1 rebuild"
if [ -n "${BACKUPWATCH_CI_DEB:-}" ]; then
	DEB1=$BACKUPWATCH_CI_DEB
	DEB2=${BACKUPWATCH_CI_DEB_UPGRADE:?BACKUPWATCH_CI_DEB_UPGRADE must name the upgrade .deb}
else
	"$REPO/packaging/build-deb.sh"
	DIST_DIR="$T/dist-upgrade" BACKUPWATCH_DEB_VERSION_SUFFIX=$UPGRADE_SUFFIX \
		"$REPO/packaging/build-deb.sh"
	ARCH=$(dpkg --print-architecture)
	DEB1=$REPO/dist/backupwatch_${PYPROJECT_VERSION}_${ARCH}.deb
	DEB2=$T/dist-upgrade/backupwatch_${PYPROJECT_VERSION}${UPGRADE_SUFFIX}_${ARCH}.deb
fi
[ -f "$DEB1" ] || fail "no package $DEB1"
[ -f "$DEB2" ] || fail "no package $DEB2"
V1=$(dpkg-deb -f "$DEB1" Version)
V2=$(dpkg-deb -f "$DEB2" Version)
dpkg --compare-versions "$V2" gt "$V1" || fail "upgrade package $V2 does not sort after $V1"
ok "$DEB1 ($V1) and $DEB2 ($V2)"

# ---------------------------------------------------------------------------------------------
step "2: runtime dependencies, test agent account, file list before installing"
# Installed first so that they are not mistaken for files the package leaves behind.
deps=$(dpkg-deb -f "$DEB1" Depends | tr ',' '\n' | sed -E 's/\(.*\)//; s/\|.*//; s/[[:space:]]//g' \
	| grep -v '^$' | sort -u | tr '\n' ' ')
# acl (Recommends) is what sets the deposit folders' default ACL; python3-seccomp is for the
# test's emulation of SystemCallFilter= (packaging/ci/sandbox_exec.py).
extra="acl python3-seccomp"
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $deps $extra >/dev/null \
	|| { apt-get update -q && apt-get install -y -q --no-install-recommends $deps $extra >/dev/null; }
ok "installed: $deps $extra"
if ! getent passwd "$AGENT" >/dev/null; then
	useradd --system --no-create-home --shell /usr/sbin/nologin "$AGENT"
	CREATED_AGENT=1
fi
snapshot >"$T/files-before.txt"
ok "$(wc -l <"$T/files-before.txt") paths recorded"

# ---------------------------------------------------------------------------------------------
step "3: install with apt ($V1)"
apt-get install -y -q --no-install-recommends "$DEB1"
[ "$(dpkg-query -W -f='${Version}' backupwatch)" = "$V1" ] || fail "backupwatch $V1 not installed"
ok "installed backupwatch $V1"

# ---------------------------------------------------------------------------------------------
step "4: what the package installed"
getent passwd backupwatch >/dev/null || fail "no user backupwatch (sysusers.d)"
getent group backupwatch >/dev/null || fail "no group backupwatch"
[ "$(getent passwd backupwatch | cut -d: -f7)" = /usr/sbin/nologin ] || fail "backupwatch has a login shell"
ok "system user and group backupwatch ($(id backupwatch))"
check_mode() { # check_mode PATH OWNER:GROUP MODE
	local got
	got=$(stat -c '%U:%G %a' "$1") || fail "$1 missing"
	[ "$got" = "$2 $3" ] || fail "$1 is $got, expected $2 $3"
	ok "$1 $2 $3"
}
check_mode /srv/backupwatch root:root 755
check_mode /srv/backupwatch/deposit root:backupwatch 751
check_mode /srv/backupwatch/validated backupwatch:backupwatch 750
check_mode /var/lib/backupwatch backupwatch:backupwatch 750
check_mode /etc/backupwatch/backupwatch.toml root:backupwatch 640
for f in /usr/bin/backupwatchd /usr/bin/backupwatchctl; do
	[ -x "$f" ] || fail "$f missing"
done
conffiles=$(dpkg-query -W -f='${Conffiles}\n' backupwatch | awk 'NF {print $1}' | sort | tr '\n' ' ')
[ "$conffiles" = "/etc/backupwatch/backupwatch.toml /etc/backupwatch/jobs.d/example.toml " ] \
	|| fail "conffiles are: $conffiles"
ok "conffiles: $conffiles"
for f in /lib/systemd/system/backupwatch.service /usr/lib/sysusers.d/backupwatch.conf \
	/usr/lib/tmpfiles.d/backupwatch.conf /usr/lib/sysctl.d/60-backupwatch.conf \
	/usr/share/doc/backupwatch/examples/remote-database.conf; do
	[ -f "$f" ] || fail "$f missing"
done
[ -L /etc/systemd/system/multi-user.target.wants/backupwatch.service ] \
	|| fail "the unit is not enabled (no multi-user.target.wants link)"
ok "unit installed and enabled"
for page in backupwatchd backupwatchctl; do
	[ -f "/usr/share/man/man8/$page.8.gz" ] || fail "no man page $page(8)"
done
if command -v man >/dev/null; then
	for page in backupwatchd backupwatchctl; do
		man -w "$page" >/dev/null 2>&1 || fail "man does not find $page(8)"
		MANWIDTH=80 man "$page" 2>&1 >/dev/null | grep . && fail "man $page prints warnings"
	done
	VERIFY_MAN=yes # the unit's Documentation=man:... must resolve too
else
	VERIFY_MAN=no
	echo "  note: man-db not installed: man pages not rendered, Documentation= not checked"
fi
ok "man pages backupwatchd(8) and backupwatchctl(8)"
got=$(/usr/bin/backupwatchd --version)
[ "$got" = "backupwatchd $PYPROJECT_VERSION" ] || fail "backupwatchd --version says '$got'"
ok "$got"
/usr/lib/backupwatch/bin/python3 -c 'import sys; assert sys.base_prefix == "/usr", sys.base_prefix' \
	|| fail "the package's virtualenv is not based on Debian's /usr/bin/python3"
/usr/lib/backupwatch/bin/python3 -c 'import systemd.daemon, systemd.journal' \
	|| fail "systemd-python is not importable in the package's virtualenv"
ok "virtualenv on Debian's python3 $(/usr/lib/backupwatch/bin/python3 -c 'import platform; print(platform.python_version())'), systemd-python importable"
# The installed unit, exactly as systemd would load it (its Exec binaries exist now).
verify_err=$(systemd-analyze verify --man="$VERIFY_MAN" backupwatch.service 2>&1 >/dev/null || true)
[ -z "$verify_err" ] || fail "systemd-analyze verify: $verify_err"
ok "systemd-analyze verify: nothing on stderr"
exposure=$(systemd-analyze security --offline=yes --threshold=15 backupwatch.service 2>&1 \
	| sed -n 's/.*Overall exposure level for backupwatch.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "systemd-analyze security failed on the installed unit"
ok "systemd-analyze security --offline=yes: exposure $exposure (threshold 1.5)"

# ---------------------------------------------------------------------------------------------
step "5: run the installed daemon as backupwatch on a temporary tree"
TREE=$T/tree
install -d -m 0755 "$TREE" "$TREE/etc" "$TREE/etc/jobs.d"
install -d -o root -g backupwatch -m 0751 "$TREE/deposit"
install -d -o backupwatch -g backupwatch -m 0750 "$TREE/validated" "$TREE/state" "$TREE/run"
# The site's deposit folder, set up as packaging/README.md tells operators to: owned by the
# agent's upload account, group backupwatch, set-gid, default ACL giving the group rw on
# everything the agent creates (whatever its umask).
install -d -o "$AGENT" -g backupwatch -m 2770 "$TREE/deposit/$SITE"
setfacl -m d:u::rwx,d:g::rwx,d:o::- "$TREE/deposit/$SITE"
cycle=$(date -u -d '+5 min' '+%H %M')
cat >"$TREE/etc/backupwatch.toml" <<EOF
backup_storage_root = "$TREE/deposit"
validated_backups_base_path = "$TREE/validated"
database_url = "sqlite:///$TREE/state/backupwatch.db"
jobs_path = "$TREE/etc/jobs.d"
control_socket = "$TREE/run/control.sock"
EOF
cat >"$TREE/etc/jobs.d/ci.toml" <<EOF
[[job]]
company_name = "ACME"
city = "Lyon"
neighborhood = "Part-Dieu"
database_name = "sales"
expected_hour_utc = $((10#${cycle% *}))
expected_minute_utc = $((10#${cycle#* }))
EOF
chmod 0644 "$TREE/etc/backupwatch.toml" "$TREE/etc/jobs.d/ci.toml"
CFG=$TREE/etc/backupwatch.toml
as_backupwatch /usr/bin/backupwatchctl --config "$CFG" check-config || fail "check-config rejects the test config"

/usr/bin/python3 "$T/notify_receiver.py" "$T/notify.sock" "$T/notify.log" &
RECEIVER_PID=$!
for _ in $(seq 1 20); do [ -S "$T/notify.sock" ] && break; sleep 0.25; done
[ -S "$T/notify.sock" ] || fail "the notify receiver did not bind $T/notify.sock"

# The sandbox is real: outside the tree nothing is writable, inside it is.
if sandboxed "$TREE" /usr/bin/touch /etc/backupwatch/sandbox-probe 2>/dev/null; then
	rm -f /etc/backupwatch/sandbox-probe
	fail "the sandbox let backupwatch write to /etc/backupwatch"
fi
sandboxed "$TREE" /usr/bin/touch "$TREE/state/sandbox-probe" || fail "the sandbox blocks the tree"
rm -f "$TREE/state/sandbox-probe"
ok "sandbox: read-only outside $TREE, writable inside"

start_daemon tree "$CFG" "$TREE"
wait_ready tree
# What sandbox_exec.py could apply (it says so on the daemon's stderr).
for what in SystemCallFilter MemoryDenyWriteExecute; do
	line=$(grep -m1 "^sandbox_exec: $what: " "$T/daemon-tree.log" || true)
	if [ -n "$line" ]; then
		ok "${line#sandbox_exec: }"
	else
		echo "  note: $what not applied: $(grep -m1 '^sandbox_exec: ' "$T/daemon-tree.log" || echo '?')"
	fi
done
sleep 5 # the watchdog: WATCHDOG_USEC=4 s, so at least one ping by now
grep -q "^pid=$DAEMON_PID WATCHDOG=1" "$T/notify.log" || fail "no WATCHDOG=1 ping within 5 s of READY"
ok "WATCHDOG=1 pings from the main pid"
others=$(grep '^pid=' "$T/notify.log" | grep -v "^pid=$DAEMON_PID " || true)
[ -z "$others" ] || fail "notifications from other processes (NotifyAccess=main): $others"
ok "every notification came from the main pid"

# ---------------------------------------------------------------------------------------------
step "6: an agent drops a report; wait for the verdict"
now=$(date -u '+%Y-%m-%dT%H:%M:%SZ')
as_agent "mkdir -p '$TREE/deposit/$SITE/database' && head -c 200000 /dev/urandom | gzip -c >'$TREE/deposit/$SITE/database/sales.sql.gz'"
staged=$TREE/deposit/$SITE/database/sales.sql.gz
sha=$(sha256sum "$staged" | cut -d' ' -f1)
size=$(stat -c %s "$staged")
staged_inode=$(stat -c %i "$staged")
cat >"$T/STATUS.json" <<EOF
{
  "agent_id": "$SITE",
  "operation_start_time": "$now",
  "operation_timestamp": "$now",
  "overall_status": "completed",
  "databases": {
    "sales": {
      "backup_process": {"status": true, "backup_process_start_time": "$now", "timestamp": "$now",
                         "sha256_checksum": "$sha", "size_bytes": $size},
      "compress_process": {"status": true, "compress_process_start_time": "$now", "timestamp": "$now",
                           "sha256_checksum": "$sha", "size_bytes": $size},
      "transfer_process": {"status": true, "transfer_process_start_time": "$now", "timestamp": "$now",
                           "error_message": null},
      "staged_file_name": "database/sales.sql.gz",
      "logs_summary": "ci-package-test.sh"
    }
  }
}
EOF
chmod 0644 "$T/STATUS.json"
as_agent "cp '$T/STATUS.json' '$TREE/deposit/$SITE/.STATUS.json.part' && mv '$TREE/deposit/$SITE/.STATUS.json.part' '$TREE/deposit/$SITE/STATUS.json'"
ok "report and staged file written by $AGENT (umask 022), report renamed into place"
/usr/bin/backupwatchctl validate "$T/STATUS.json" >/dev/null || fail "backupwatchctl validate rejects the test report"
for i in $(seq 1 60); do
	if as_backupwatch /usr/bin/backupwatchctl --config "$CFG" history "$JOB" --json >"$T/history.json" 2>"$T/history.err" \
		&& [ "$(json_get "$T/history.json" 'len(d)')" -gt 0 ]; then
		break
	fi
	sleep 0.5
done
[ -s "$T/history.json" ] && [ "$(json_get "$T/history.json" 'len(d)')" -gt 0 ] \
	|| fail "no verdict within 30 s: $(cat "$T/history.err" 2>/dev/null)"
verdict=$(json_get "$T/history.json" 'd[0]["status"]')
[ "$verdict" = SUCCESS ] || fail "verdict $verdict: $(json_get "$T/history.json" 'd[0]["message"]')"
final=$(json_get "$T/history.json" 'd[0]["final_path"]')
ok "verdict SUCCESS after ~$((i / 2)) s: $final"
[ "$(json_get "$T/history.json" 'd[0]["server_sha256"]')" = "$sha" ] || fail "server_sha256 differs"
[ -f "$final" ] || fail "final file $final missing"
case "$final" in "$TREE/validated/"*) ;; *) fail "final path outside the validated root" ;; esac
[ "$(sha256sum "$final" | cut -d' ' -f1)" = "$sha" ] || fail "final file's SHA-256 differs"
[ "$(stat -c %i "$final")" = "$staged_inode" ] \
	|| fail "the backup was copied, not hard-linked (protected_hardlinks / ACL or mount layout?)"
ok "final file in place, same SHA-256, same inode: moved by link(2), not copied"
[ ! -e "$staged" ] || fail "the staged file is still in the deposit folder"
ls "$TREE/deposit/$SITE/_archive/"*.json >/dev/null 2>&1 || fail "the report was not archived"
[ ! -e "$TREE/deposit/$SITE/STATUS.json" ] || fail "the report is still in the deposit folder"
ok "staged file gone, report in _archive/"

# ---------------------------------------------------------------------------------------------
step "7: backupwatchctl status and reload against the running daemon"
as_backupwatch /usr/bin/backupwatchctl --config "$CFG" status >"$T/status.txt" \
	|| fail "backupwatchctl status exit $? (daemon running): $(cat "$T/status.txt")"
sed 's/^/  | /' "$T/status.txt"
as_backupwatch /usr/bin/backupwatchctl --config "$CFG" status --json >"$T/status.json" \
	|| fail "backupwatchctl status --json failed"
[ "$(json_get "$T/status.json" 'd["daemon"]["running"]')" = True ] || fail "status: daemon not running"
[ "$(json_get "$T/status.json" 'd["daemon"]["version"]')" = "$PYPROJECT_VERSION" ] || fail "status: wrong version"
[ "$(json_get "$T/status.json" 'd["jobs"][0]["current_status"]')" = OK ] || fail "status: job not OK"
ok "status exit 0, daemon running, version $PYPROJECT_VERSION, job OK"
# ExecReload= runs backupwatchctl reload as the service user inside the sandbox.
sandboxed "$TREE" /usr/bin/backupwatchctl --config "$CFG" reload || fail "backupwatchctl reload exit $?"
ok "reload exit 0"
cp "$CFG" "$T/backupwatch.toml.good"
echo 'no_such_key = 1' >>"$CFG"
set +e
sandboxed "$TREE" /usr/bin/backupwatchctl --config "$CFG" reload >"$T/reload-bad.txt" 2>&1
rc=$?
set -e
[ "$rc" -eq 1 ] || fail "reload of an invalid config exited $rc, expected 1 (systemctl reload must fail)"
kill -0 "$DAEMON_PID" || fail "the daemon died on an invalid reload"
ok "reload of an invalid config: exit 1, daemon still running ($(grep -v "^sandbox_exec:" "$T/reload-bad.txt" | tail -n 1))"
cp "$T/backupwatch.toml.good" "$CFG"
sandboxed "$TREE" /usr/bin/backupwatchctl --config "$CFG" reload >/dev/null || fail "reload after the fix failed"
grep -q "^pid=$DAEMON_PID RELOADING=1" "$T/notify.log" || fail "no RELOADING=1 during reload"
ok "RELOADING=1 ... READY=1 around reloads"
stop_daemon tree
set +e
as_backupwatch /usr/bin/backupwatchctl --config "$CFG" status >/dev/null 2>&1
rc=$?
set -e
[ "$rc" -eq 3 ] || fail "status with the daemon down exited $rc, expected 3"
ok "status with the daemon down: exit 3"

# ---------------------------------------------------------------------------------------------
step "8: the packaged configuration, as an operator uses it"
# What systemd's RuntimeDirectory= would create.
install -d -o backupwatch -g backupwatch -m 0750 /run/backupwatch
CREATED_RUNDIR=1
# What the unit lets it write: ReadWritePaths=/srv/backupwatch, StateDirectory, RuntimeDirectory.
PKG_RW="/srv/backupwatch /var/lib/backupwatch /run/backupwatch"
cat >/etc/backupwatch/jobs.d/ci.toml <<EOF
# added by ci-package-test.sh: an operator's own job file
[[job]]
company_name = "ACME"
city = "Lyon"
neighborhood = "Part-Dieu"
database_name = "sales"
expected_hour_utc = 3
EOF
/usr/bin/backupwatchctl check-config || fail "check-config (as root, packaged config) failed"
start_daemon packaged /etc/backupwatch/backupwatch.toml "$PKG_RW"
wait_ready packaged
/usr/bin/backupwatchctl status >"$T/status-packaged.txt" || fail "backupwatchctl status as root: exit $?"
sed 's/^/  | /' "$T/status-packaged.txt"
grep -q "Part-Dieu" "$T/status-packaged.txt" || fail "status does not list the job of jobs.d/ci.toml"
ok "backupwatchctl status (root, default config): exit 0, job listed"
stop_daemon packaged
[ -f /var/lib/backupwatch/backupwatch.db ] || fail "no database at /var/lib/backupwatch/backupwatch.db"
wrong=$(find /var/lib/backupwatch /srv/backupwatch ! -user backupwatch ! -path /srv/backupwatch \
	! -path /srv/backupwatch/deposit)
[ -z "$wrong" ] || fail "files not owned by backupwatch (root's backupwatchctl?): $wrong"
ok "the database exists, every state file belongs to backupwatch"

# ---------------------------------------------------------------------------------------------
step "9: upgrade to $V2 with dpkg -i: config edit, job file and database survive"
sed -i 's/^#rescan_interval_minutes = 10$/rescan_interval_minutes = 15/' /etc/backupwatch/backupwatch.toml
grep -q '^rescan_interval_minutes = 15$' /etc/backupwatch/backupwatch.toml || fail "could not edit the conffile"
db_sum=$(sha256sum /var/lib/backupwatch/backupwatch.db | cut -d' ' -f1)
dpkg -i --force-confdef --force-confold "$DEB2"
[ "$(dpkg-query -W -f='${Version}' backupwatch)" = "$V2" ] || fail "$V2 not installed"
grep -q '^rescan_interval_minutes = 15$' /etc/backupwatch/backupwatch.toml || fail "the conffile edit was lost"
[ -f /etc/backupwatch/jobs.d/ci.toml ] || fail "the operator's job file was lost"
[ "$(sha256sum /var/lib/backupwatch/backupwatch.db | cut -d' ' -f1)" = "$db_sum" ] \
	|| fail "the database changed during the upgrade"
check_mode /etc/backupwatch/backupwatch.toml root:backupwatch 640
ls /etc/backupwatch/*.dpkg-* /etc/backupwatch/jobs.d/*.dpkg-* >/dev/null 2>&1 \
	&& fail "dpkg left .dpkg-* files: $(ls /etc/backupwatch/*.dpkg-* /etc/backupwatch/jobs.d/*.dpkg-* 2>/dev/null)"
ok "upgraded to $V2: edit kept, job file kept, database unchanged, config still 0640"
start_daemon upgraded /etc/backupwatch/backupwatch.toml "$PKG_RW"
wait_ready upgraded
/usr/bin/backupwatchctl status --json >"$T/status-upgraded.json" || fail "status after the upgrade: exit $?"
[ "$(json_get "$T/status-upgraded.json" 'len(d["jobs"])')" = 1 ] || fail "status after the upgrade lost the job"
ok "the upgraded daemon starts on the kept database and config"
stop_daemon upgraded
rm -rf /run/backupwatch
CREATED_RUNDIR=0

# ---------------------------------------------------------------------------------------------
step "10: dpkg -r: the program goes, configuration and database stay"
dpkg -r backupwatch
[ "$(dpkg-query -W -f='${db:Status-Status}' backupwatch)" = config-files ] || fail "not in config-files state"
for f in /usr/bin/backupwatchd /usr/bin/backupwatchctl /usr/lib/backupwatch /lib/systemd/system/backupwatch.service; do
	[ ! -e "$f" ] || fail "$f still exists after dpkg -r"
done
[ -f /etc/backupwatch/backupwatch.toml ] || fail "the configuration was removed by dpkg -r"
[ -f /var/lib/backupwatch/backupwatch.db ] || fail "the database was removed by dpkg -r"
ok "removed; /etc/backupwatch and /var/lib/backupwatch/backupwatch.db kept"

# ---------------------------------------------------------------------------------------------
step "11: dpkg --purge: configuration and state go, nothing left behind"
dpkg --purge backupwatch
dpkg-query -W -f='${db:Status-Status}' backupwatch 2>/dev/null | grep -qv '^not-installed$' \
	&& fail "backupwatch still known to dpkg after purge"
for f in /etc/backupwatch /var/lib/backupwatch /srv/backupwatch \
	/etc/systemd/system/multi-user.target.wants/backupwatch.service; do
	[ ! -e "$f" ] || fail "$f still exists after purge"
done
dpkg-statoverride --list /etc/backupwatch/backupwatch.toml >/dev/null 2>&1 \
	&& fail "the dpkg-statoverride of backupwatch.toml is still there"
ok "configuration, state, empty storage roots, unit links and statoverride gone"
if [ "$CREATED_AGENT" = 1 ]; then
	userdel "$AGENT"
	CREATED_AGENT=0
fi
snapshot >"$T/files-after.txt"
# The system user stays on purpose (Debian practice; packaging/README.md); so do the shadow
# backups that creating it may have made.
diff "$T/files-before.txt" "$T/files-after.txt" \
	| grep -E '^[<>] ' | grep -vE '^> /etc/(passwd|group|shadow|gshadow)-$' >"$T/files-diff.txt" || true
if [ -s "$T/files-diff.txt" ]; then
	cat "$T/files-diff.txt" >&2
	fail "files differ before installing and after purging ('>' left behind, '<' removed)"
fi
ok "no file left behind in ${SNAPSHOT_ROOTS[*]}"

STEP="(done)"
printf '\nci-package-test.sh: all steps passed (backupwatch %s -> %s)\n' "$V1" "$V2"
