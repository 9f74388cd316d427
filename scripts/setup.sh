#!/bin/sh
# Set up pyvmm on a Debian or Ubuntu machine, then boot the default guest.
#
#   scripts/setup.sh            install what is missing, then `pyvmm run --cpus 2`
#   scripts/setup.sh --no-run   install only
#   scripts/setup.sh --ci       install what the whole test suite needs (QEMU
#                               included on every host), no guest (.ci/run)
#
# What it installs, and why:
# - apt: Python with venv and headers, gcc and the kernel headers (pip builds
#   pyvmm's cffi extension from <linux/kvm.h>), e2fsprogs (guest root
#   filesystems), cpio, busybox-static, acpica-tools (the ACPI table tests),
#   iproute2 (TAP tests) and, where KVM cannot run guest kernel code at
#   hardware speed (no vmx/svm: PVM), qemu-system-x86 for the nested host.
#   Only packages that are missing are installed; apt-get needs root (sudo is
#   used when not root).
# - pip: pyvmm in editable mode (compat) with its test extras, into the active virtual
#   environment, or else into .venv here (Debian's own Python refuses pip
#   installs outside one). .venv always points at the environment used, so
#   `.venv/bin/python3 -m pytest` runs the tests afterwards.
# Guest kernels and busybox are not installed: pyvmm fetches them into its
# cache ($PYVMM_CACHE or ~/.cache/pyvmm) on first use, with `apt-get download`.
set -eu

cd "$(dirname "$0")/.."
run_guest=1
ci=0
for arg in "$@"; do
    case "$arg" in
        --no-run) run_guest=0 ;;
        --ci) ci=1 run_guest=0 ;;
        -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
    say "this script needs apt (Debian or Ubuntu); install by hand what it lists in its header"
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1; then
    as_root="sudo"
else
    say "installing packages needs root: run this as root, or install sudo"
    exit 1
fi

# Real VMX/SVM runs Linux guests directly; PVM (or no KVM) needs the nested host.
nested_needed=1
if grep -qwE 'vmx|svm' /proc/cpuinfo 2>/dev/null && [ ! -d /sys/module/kvm_pvm ]; then
    nested_needed=0
fi

missing=""
need() {  # need PACKAGE: add it unless dpkg says it is installed
    if ! dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; then
        missing="$missing $1"
    fi
}
has_python() {  # a python3 >= 3.11 with venv and headers, from apt or not
    command -v python3 >/dev/null 2>&1 &&
        python3 -c 'import sys, venv, sysconfig, os
sys.exit(sys.version_info < (3, 11) or not os.path.exists(
    os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}
has_python || { need python3; need python3-venv; need python3-dev; need python3-pip; }
command -v gcc >/dev/null 2>&1 || need gcc
need libc6-dev          # libc.a for the static guest tools, and crt files for gcc
need linux-libc-dev     # <linux/kvm.h>
need ca-certificates
command -v mkfs.ext4 >/dev/null 2>&1 || need e2fsprogs
command -v cpio >/dev/null 2>&1 || need cpio
need busybox-static
command -v iasl >/dev/null 2>&1 || need acpica-tools
command -v ip >/dev/null 2>&1 || need iproute2
if [ "$nested_needed" = 1 ] || [ "$ci" = 1 ]; then
    command -v qemu-system-x86_64 >/dev/null 2>&1 || need qemu-system-x86
fi
if [ -n "$missing" ]; then
    say "installing with apt-get:$missing"
    export DEBIAN_FRONTEND=noninteractive
    $as_root apt-get update -q
    # shellcheck disable=SC2086 # one word per package
    $as_root apt-get install -y -q --no-install-recommends $missing
else
    say "all needed apt packages are installed"
fi

# The apt lists must be current for `apt-get download` of the guest kernels.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    say "updating the apt package lists (pyvmm downloads guest kernels through apt)"
    $as_root apt-get update -q
fi

if [ -n "${VIRTUAL_ENV:-}" ]; then
    python="$VIRTUAL_ENV/bin/python3"
    if [ "$(readlink -f .venv 2>/dev/null)" != "$(readlink -f "$VIRTUAL_ENV")" ]; then
        [ -e .venv ] && [ ! -L .venv ] && { say ".venv exists and is not $VIRTUAL_ENV"; exit 1; }
        ln -sfn "$VIRTUAL_ENV" .venv
    fi
else
    [ -x .venv/bin/python3 ] || { say "creating the virtual environment .venv"; python3 -m venv .venv; }
    python=.venv/bin/python3
fi
say "installing pyvmm and its test extras into $(readlink -f .venv)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# compat mode: the editable install is a path in a .pth file, not setuptools'
# import-hook finder, which site imports at every interpreter start (about 30 ms
# of each pyvmm start on the team's host; measured with a bare `python -c`).
"$python" -m pip install -q --config-settings editable_mode=compat -e '.[test]'
# pyrecracker (a test client) declares Python >= 3.12 but runs on 3.11: there
# it is installed without that check, at the version pyproject.toml pins.
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
    pin=$(grep -o 'pyrecracker==[0-9][0-9.]*' pyproject.toml | head -n 1)
    [ -z "$pin" ] || "$python" -m pip install -q --no-deps --ignore-requires-python "$pin"
fi

"$python" -m pyvmm doctor | grep -E '^(kvm device|virtualization|pyvmm run):' >&2 || true
if [ "$run_guest" = 1 ]; then
    say "booting the default guest (Ctrl-A X quits; 'poweroff' shuts it down)"
    exec "$python" -m pyvmm run --cpus 2
fi
say "done; run the tests with: .venv/bin/python3 -m pytest"
