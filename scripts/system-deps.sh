#!/usr/bin/env bash
# Install the system packages a command of the README needs, or say in ONE line how to.
#
#   scripts/system-deps.sh test   # Xvfb + the xcb libraries PyQt6 needs (napari tests)
#   scripts/system-deps.sh demo   # the same without a display; with one, the xcb libraries only
#   scripts/system-deps.sh venv   # python3-venv when `$PYTHON -m venv` fails (Debian's python3)
#   scripts/system-deps.sh make   # make itself (for .ci/run on a bare machine)
#
# On Debian/Ubuntu the missing packages are installed with apt-get, as root or through
# `sudo -n` (never a password prompt). Otherwise one line names the packages and the command
# to install them, and the exit status is 1. Elsewhere (no dpkg) the needed programs are
# looked for instead. Everything is checked first, so a machine that has it all installs
# nothing and prints nothing.
set -euo pipefail

# napari under a virtual screen: Xvfb (xvfb-run needs xauth) plus the xcb libraries PyQt6's
# platform plugin loads. (With QT_QPA_PLATFORM=offscreen napari's canvas crashes on
# screenshot, so the project uses Xvfb.)
XVFB_PKGS=(xvfb xauth)
QT_PKGS=(libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-cursor0)

has_display() {
    [ -n "${DISPLAY:-}" ] || [ -n "${WAYLAND_DISPLAY:-}" ] || [ "$(uname -s)" = Darwin ]
}

what="${1:-}"
case "$what" in
    test) pkgs=("${XVFB_PKGS[@]}" "${QT_PKGS[@]}"); progs=(Xvfb) ;;
    demo)
        if has_display; then
            pkgs=("${QT_PKGS[@]}"); progs=()
        else
            pkgs=("${XVFB_PKGS[@]}" "${QT_PKGS[@]}"); progs=(xvfb-run)
        fi ;;
    venv)
        # try the real thing: Debian's python3 has the venv module but not ensurepip
        py="${PYTHON:-python3}"
        tmp="$(mktemp -d)"
        if "$py" -m venv "$tmp/v" >/dev/null 2>&1; then rm -rf "$tmp"; exit 0; fi
        rm -rf "$tmp"
        pkgs=(python3 python3-venv); progs=("$py") ;;
    make) pkgs=(make); progs=(make) ;;
    *) echo "usage: $0 test|demo|venv|make" >&2; exit 2 ;;
esac

if ! command -v dpkg-query >/dev/null 2>&1; then
    # not Debian: we cannot name packages, only programs
    for prog in "${progs[@]}"; do
        if ! command -v "$prog" >/dev/null 2>&1; then
            if [ "$what" = test ] && has_display; then continue; fi  # pytest-xvfb uses the display
            echo "make $what needs $prog: install it with your package manager (Debian: apt-get install ${pkgs[*]})" >&2
            exit 1
        fi
    done
    exit 0
fi

missing=()
for p in "${pkgs[@]}"; do
    # "ii" = installed; `dpkg -s` also succeeds for removed packages that left config files
    [ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null)" = "ii " ] || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    as_root=(sudo -n)
else
    echo "make $what needs the Debian packages ${missing[*]}: install them with: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
echo "make $what: installing Debian packages ${missing[*]}" >&2
if ! { "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2; then
    echo "make $what: apt-get could not install ${missing[*]}: run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
