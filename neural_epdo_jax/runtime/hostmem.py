"""Transparent huge pages for the C heap of a CPU run (plain Python: no JAX import).

XLA's CPU runtime allocates the large temporaries of every step afresh; glibc serves them
with ``mmap`` and unmaps them when they are freed, so each step first touches hundreds of MB
of new 4 KiB pages: tens of thousands of page faults per training step, and in a
data-parallel run the devices' faults contend for the process's memory map. glibc 2.35+ can
ask for transparent huge pages on those mappings (the tunable ``glibc.malloc.hugetlb=1``),
which leaves a few hundred faults per step: training and evaluation about a quarter faster
at the same peak memory (docs/performance.md).

glibc reads tunables only when a process starts. ``run.sh`` exports the tunable, and every
entry point (train.py, the ``tools`` command lines, the benchmarks, the examples) calls
:func:`reexec_with_huge_pages` first through `runtime.host.setup_host`, which starts the same
command again with it when it is missing. A script of your own gets it with
``export GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` in its shell, or by calling ``setup_host()``
first thing in its ``__main__`` block.
``NEURAL_EPDO_JAX_HUGE_PAGES=0`` opts out; a ``hugetlb`` value already in ``GLIBC_TUNABLES``
is kept as it is.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "NEURAL_EPDO_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return None
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if name == "glibc" and match else None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The current (bracketed) mode in a THP control file: 'always', 'madvise', 'never', ...
    for ``enabled``, 'defer+madvise' and others for ``defrag``; None if unreadable."""
    try:
        with open(path) as f:
            match = re.search(r"\[([^\]]+)\]", f.read())
    except OSError:
        return None
    return match[1] if match else None


def huge_page_env(
    env: Mapping[str, str],
    *,
    glibc: tuple[int, int] | None = None,
    thp: str | None = None,
) -> dict[str, str] | None:
    """``env`` with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES``, or None when there
    is nothing to add: opted out (``NEURAL_EPDO_JAX_HUGE_PAGES=0``), a hugetlb value already
    set, a C library other than glibc >= 2.35, or a kernel whose huge-page mode is not
    'madvise' ('always' gives every mapping huge pages already, 'never' gives none).
    ``glibc`` and ``thp`` default to this host's (`glibc_version`, `thp_mode`)."""
    if env.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    glibc = glibc_version() if glibc is None else glibc
    thp = thp_mode() if thp is None else thp
    if glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    new = dict(env)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return new


def reexec_with_huge_pages() -> None:
    """Starts this command again (same interpreter, same command line) with the huge-page
    tunable when `huge_page_env` adds it; returns when it does not. Call it first thing in a
    command-line entry point, before threads start or files open. An interactive
    interpreter and code read from stdin or ``-c`` are left alone."""
    new = huge_page_env(os.environ)
    argv = list(getattr(sys, "orig_argv", []))
    # sys.argv[0]: the script or module path; '-c' for code given on the command line,
    # '' or '-' for an interactive interpreter or code read from stdin.
    if new is None or not argv or not sys.executable or sys.flags.interactive:
        return
    if sys.argv[0] in ("", "-", "-c"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, new)
