"""``scripts/system-deps.sh``: what ``make test`` / ``make demo`` install on a fresh machine.

The script runs for real (bash) with stand-ins for the system's package tools earlier on
PATH: ``dpkg-query`` answers from a list of "installed" packages, ``apt-get`` records its
arguments, ``id`` and ``sudo`` play root / a sudoer / a plain user. Nothing is installed or
removed on the machine running the tests. (The real remove-and-install proof, on a machine
whose Xvfb packages may be removed, is a manual step.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-deps.sh"
XVFB = ["xvfb", "xauth"]
QT = ["libxcb-icccm4", "libxcb-keysyms1", "libxcb-xinerama0", "libxcb-cursor0"]
TOOLS = ("env", "uname", "mktemp", "rm", "cat", "true", "mkdir")  # the script and stand-ins use


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Run the script on a pretend machine; returns ``run(what, **state) -> (rc, stderr, apt)``."""
    fake = tmp_path / "fake"
    tools = tmp_path / "tools"
    fake.mkdir()
    tools.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (tools / tool).symlink_to(found)
    log = tmp_path / "apt.log"
    _fake(
        fake,
        "dpkg-query",
        # dpkg-query -W -f=FORMAT PKG: "ii " when PKG is installed, else exit 1
        'for p in $FAKE_INSTALLED; do [ "$p" = "${@: -1}" ] && { printf "ii "; exit 0; }; done\n'
        'echo "dpkg-query: no packages found matching ${@: -1}" >&2; exit 1',
    )
    _fake(fake, "apt-get", f'echo "$DEBIAN_FRONTEND $*" >> {log}; exit "${{FAKE_APT_RC:-0}}"')
    _fake(fake, "id", 'echo "$FAKE_UID"')
    _fake(
        fake,
        "sudo",
        'if [ "$FAKE_SUDO" = ok ]; then [ "$1" = -n ] && shift; exec "$@"; fi\n'
        'echo "sudo: a password is required" >&2; exit 1',
    )

    def run(
        what: str,
        *,
        installed: list[str],
        uid: int = 0,
        sudo: str | None = None,
        display: str | None = None,
        apt_rc: int = 0,
        dpkg: bool = True,
        extra_path: Path | None = None,
    ) -> tuple[int, list[str], list[str]]:
        if not sudo:
            (fake / "sudo").unlink(missing_ok=True)
        if not dpkg:
            (fake / "dpkg-query").unlink(missing_ok=True)
        path = [str(fake), str(tools)] + ([str(extra_path)] if extra_path else [])
        env = {
            "PATH": os.pathsep.join(path),
            "FAKE_INSTALLED": " ".join(installed),
            "FAKE_UID": str(uid),
            "FAKE_SUDO": sudo or "",
            "FAKE_APT_RC": str(apt_rc),
            "HOME": str(tmp_path),
        }
        if display:
            env["DISPLAY"] = display
        proc = subprocess.run(
            ["/bin/bash", str(SCRIPT), what], env=env, capture_output=True, text=True, timeout=60
        )
        apt = log.read_text().splitlines() if log.exists() else []
        return proc.returncode, proc.stderr.strip().splitlines(), apt

    return run


def test_everything_installed_does_nothing_and_says_nothing(machine) -> None:  # type: ignore[no-untyped-def]
    rc, err, apt = machine("test", installed=XVFB + QT, uid=1000)
    assert (rc, err, apt) == (0, [], [])


def test_root_installs_exactly_the_missing_packages(machine) -> None:  # type: ignore[no-untyped-def]
    rc, err, apt = machine("test", installed=["xauth", *QT[1:]], uid=0)
    assert rc == 0
    assert apt == [
        "noninteractive update -qq",
        "noninteractive install -y -qq xvfb libxcb-icccm4",
    ]
    assert err == ["make test: installing Debian packages xvfb libxcb-icccm4"]


def test_a_sudoer_installs_through_sudo_without_a_prompt(machine) -> None:  # type: ignore[no-untyped-def]
    rc, _, apt = machine("test", installed=QT, uid=1000, sudo="ok")
    assert rc == 0 and apt[-1] == "noninteractive install -y -qq xvfb xauth"


@pytest.mark.parametrize("sudo", [None, "password-needed"], ids=["no-sudo", "sudo-asks"])
def test_a_plain_user_gets_one_line_naming_packages_and_command(machine, sudo) -> None:  # type: ignore[no-untyped-def]
    rc, err, apt = machine("test", installed=QT[:2], uid=1000, sudo=sudo)
    missing = "xvfb xauth libxcb-xinerama0 libxcb-cursor0"
    assert rc == 1 and apt == []
    assert err == [
        f"make test needs the Debian packages {missing}: "
        f"install them with: sudo apt-get install -y {missing}"
    ]


def test_a_failed_install_stops_with_one_closing_line(machine) -> None:  # type: ignore[no-untyped-def]
    rc, err, _ = machine("test", installed=QT, uid=0, apt_rc=100)
    assert rc == 1
    assert err[-1] == (
        "make test: apt-get could not install xvfb xauth: run: sudo apt-get install -y xvfb xauth"
    )


def test_demo_with_a_display_needs_no_xvfb(machine) -> None:  # type: ignore[no-untyped-def]
    assert machine("demo", installed=QT, uid=1000, display=":0") == (0, [], [])
    rc, _, apt = machine("demo", installed=XVFB, uid=0, display=":0")
    assert rc == 0 and apt[-1] == f"noninteractive install -y -qq {' '.join(QT)}"


def test_demo_without_a_display_installs_xvfb(machine) -> None:  # type: ignore[no-untyped-def]
    rc, _, apt = machine("demo", installed=QT, uid=0)
    assert rc == 0 and apt[-1] == "noninteractive install -y -qq xvfb xauth"


def test_make_itself(machine) -> None:  # type: ignore[no-untyped-def]
    rc, err, apt = machine("make", installed=[], uid=1000)
    assert rc == 1 and err == [
        "make make needs the Debian packages make: install them with: sudo apt-get install -y make"
    ]
    rc, _, apt = machine("make", installed=[], uid=0)
    assert rc == 0 and apt[-1] == "noninteractive install -y -qq make"


def test_venv_support_is_checked_by_making_one(machine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "good"
    good.mkdir()
    _fake(good, "python3", 'mkdir -p "${@: -1}"')  # `python3 -m venv DIR` works
    assert machine("venv", installed=[], uid=1000, extra_path=good) == (0, [], [])
    bad = tmp_path / "bad"
    bad.mkdir()
    _fake(bad, "python3", 'echo "ensurepip is not available" >&2; exit 1')  # Debian, no venv
    rc, err, _ = machine("venv", installed=["python3"], uid=1000, extra_path=bad)
    assert rc == 1 and err == [
        "make venv needs the Debian packages python3-venv: "
        "install them with: sudo apt-get install -y python3-venv"
    ]


def test_not_debian_names_the_program(machine, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rc, err, _ = machine("demo", installed=[], uid=1000, dpkg=False)
    assert rc == 1 and len(err) == 1 and "make demo needs xvfb-run" in err[0]
    assert machine("test", installed=[], uid=1000, dpkg=False, display=":0") == (0, [], [])
    xvfb = tmp_path / "xvfb"
    xvfb.mkdir()
    _fake(xvfb, "Xvfb", "exit 0")
    assert machine("test", installed=[], uid=1000, dpkg=False, extra_path=xvfb) == (0, [], [])
