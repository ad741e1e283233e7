#!/bin/bash
# Build dist/backupwatch_<version>_<arch>.deb from this checkout, then run lintian on it.
#
#   packaging/build-deb.sh
#
# Run as root on Debian 12, it first apt-installs the missing build dependencies. The Python
# dependencies are downloaded by pip (PyPI, or whatever pip.conf / PIP_* point at).
#
# Environment:
#   BACKUPWATCH_DEB_VERSION_SUFFIX  appended to the Debian version (e.g. +ci1: a rebuild that
#                                   sorts after the plain release, for upgrade tests)
#   BACKUPWATCH_SKIP_APT=1          never call apt-get (the build deps must be installed)
#   BACKUPWATCH_KEEP_BUILD=1        keep the temporary build tree (its path is printed)
#   DIST_DIR                        where the .deb and lintian's report go (default: dist/)
#
# The repository has no debian/ at its root: packaging/debian/ is copied into a temporary
# copy of the checkout (tracked and untracked-but-not-ignored files), and debian/changelog is
# generated there from pyproject.toml by packaging/debian_changelog.py.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIST_DIR=${DIST_DIR:-$REPO/dist}
SUFFIX=${BACKUPWATCH_DEB_VERSION_SUFFIX:-}

# Debian's toolchain and Debian's python3 only: a pyenv or virtualenv python first on PATH must
# not leak into dh-virtualenv, dpkg-buildpackage or the package's virtualenv.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
unset VIRTUAL_ENV PYTHONHOME PYTHONPATH PYENV_VERSION CONDA_PREFIX PYTHONSTARTUP
export LC_ALL=C.UTF-8

BUILD_DEPS=(
	build-essential debhelper dh-virtualenv fakeroot lintian
	libsystemd-dev pkg-config python3 python3-dev python3-venv
)

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'build-deb.sh: %s\n' "$*" >&2; exit 1; }

install_build_deps() {
	local missing=() pkg
	for pkg in "${BUILD_DEPS[@]}"; do
		dpkg-query -W -f='${db:Status-Status}\n' "$pkg" 2>/dev/null | grep -qx installed \
			|| missing+=("$pkg")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	if [ "$(id -u)" -ne 0 ] || [ "${BACKUPWATCH_SKIP_APT:-0}" = 1 ]; then
		die "missing build dependencies: ${missing[*]} (run as root, or: apt-get install ${missing[*]})"
	fi
	say "installing build dependencies: ${missing[*]}"
	# Only refresh the lists when apt does not know a package (a fresh container).
	if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
		apt-get update -q
	fi
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

copy_checkout() {
	local dest=$1
	mkdir -p "$dest"
	if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
		# What a clean checkout holds plus new files not yet committed, never ignored ones
		# (.venv, dist/, caches); files deleted in the working tree are skipped.
		(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
			| while IFS= read -r -d '' f; do
				[ -e "$f" ] || [ -L "$f" ] && printf '%s\0' "$f"
			done \
			| tar --null --no-recursion -T - -cf -) | tar -xf - -C "$dest"
	else
		tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build \
			--exclude='__pycache__' --exclude='*.egg-info' --exclude='./.*_cache' \
			--exclude=./.hypothesis -cf - . | tar -xf - -C "$dest"
	fi
	rm -rf "$dest/debian"
	cp -a "$REPO/packaging/debian" "$dest/debian"
}

install_build_deps

# The versions must agree before anything is built (tests/packaging/test_version.py checks the
# same); a suffix only marks a rebuild of that release.
/usr/bin/python3 "$REPO/packaging/debian_changelog.py" --repo "$REPO" --check \
	|| die "version mismatch (see above): fix pyproject.toml, backupwatch/__init__.py or CHANGELOG.md"
VERSION=$(/usr/bin/python3 "$REPO/packaging/debian_changelog.py" --repo "$REPO" --print-version \
	--suffix "$SUFFIX")
ARCH=$(dpkg --print-architecture)
DEB=backupwatch_${VERSION}_${ARCH}.deb

WORK=$(mktemp -d /tmp/backupwatch-deb.XXXXXX)
if [ "${BACKUPWATCH_KEEP_BUILD:-0}" = 1 ]; then
	trap 'echo "build tree kept: $WORK"' EXIT
else
	trap 'rm -rf "$WORK"' EXIT
fi
SRC=$WORK/backupwatch-$VERSION

say "preparing $SRC"
copy_checkout "$SRC"
/usr/bin/python3 "$REPO/packaging/debian_changelog.py" --repo "$REPO" --suffix "$SUFFIX" \
	>"$SRC/debian/changelog"

say "dpkg-buildpackage (backupwatch $VERSION, $ARCH)"
(cd "$SRC" && dpkg-buildpackage -us -uc -b)

mkdir -p "$DIST_DIR"
cp "$WORK/$DEB" "$DIST_DIR/$DEB"
say "built $DIST_DIR/$DEB"
dpkg-deb --info "$DIST_DIR/$DEB"

say "lintian"
# Every tag down to pedantic and experimental is shown (each override is justified in
# packaging/debian/backupwatch.lintian-overrides); --fail-on error: only errors fail the build.
# (Its complaint about running as root is dropped: the build runs as root by design.)
set +e
lintian --info --display-info --pedantic --display-experimental --fail-on error \
	"$WORK/backupwatch_${VERSION}_${ARCH}.changes" 2>&1 \
	| grep -v '^running with root privileges is not recommended!$' \
	| tee "$DIST_DIR/lintian-$VERSION.txt"
status=${PIPESTATUS[0]}
set -e
if [ ! -s "$DIST_DIR/lintian-$VERSION.txt" ]; then
	echo "(lintian: no tags)" | tee "$DIST_DIR/lintian-$VERSION.txt"
fi
[ "$status" -eq 0 ] || die "lintian reports errors (exit $status)"
say "done: $DIST_DIR/$DEB"
