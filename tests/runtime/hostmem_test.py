"""Tests for neural_epdo_jax.runtime.hostmem (huge pages for the C heap; no JAX needed)."""

import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest

from neural_epdo_jax.runtime import hostmem

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Counts its runs in a file, re-executes through hostmem, prints the tunables it ended with.
_SCRIPT = r"""
import os, sys
sys.path.insert(0, {repo!r})
with open({count!r}, "a") as f:
    f.write("run\n")
from neural_epdo_jax.runtime import hostmem
hostmem.reexec_with_huge_pages()
print("TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))
"""

# Touches a fresh 64 MiB malloc block and prints the page faults that took.
_FAULTS = r"""
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
p = libc.malloc(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(p, 1, n)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
    env.update(extra)
    return env


def _host_supported() -> bool:
    return hostmem.huge_page_env(_clean_env()) is not None


class HugePageEnvTest(absltest.TestCase):
    def test_adds_the_tunable(self):
        env = hostmem.huge_page_env({"A": "1"}, glibc=(2, 36), thp="madvise")
        self.assertEqual(env, {"A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})

    def test_appends_to_other_tunables(self):
        env = hostmem.huge_page_env(
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc=(2, 35), thp="madvise"
        )
        self.assertEqual(env["GLIBC_TUNABLES"], "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")

    def test_nothing_to_add(self):
        ok = dict(glibc=(2, 36), thp="madvise")
        cases = {
            "set already": ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ok),
            "opted out": ({hostmem.OPT_OUT: "0"}, ok),
            "opted out (off)": ({hostmem.OPT_OUT: "off"}, ok),
            "old glibc": ({}, dict(glibc=(2, 34), thp="madvise")),
            "THP always": ({}, dict(glibc=(2, 36), thp="always")),
            "THP never": ({}, dict(glibc=(2, 36), thp="never")),
        }
        for name, (env, host) in cases.items():
            with self.subTest(name):
                self.assertIsNone(hostmem.huge_page_env(env, **host))
        # Opting in explicitly still adds it.
        self.assertIsNotNone(hostmem.huge_page_env({hostmem.OPT_OUT: "1"}, **ok))

    def test_thp_mode_parses_the_kernel_file(self):
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("always [madvise] never\n")
        self.addCleanup(os.remove, f.name)
        self.assertEqual(hostmem.thp_mode(f.name), "madvise")
        with open(f.name, "w") as g:
            g.write("always defer [defer+madvise] madvise never\n")
        self.assertEqual(hostmem.thp_mode(f.name), "defer+madvise")
        self.assertIsNone(hostmem.thp_mode(f.name + ".missing"))

    def test_glibc_version(self):
        version = hostmem.glibc_version()
        if sys.platform.startswith("linux") and version is not None:
            self.assertGreaterEqual(version, (2, 17))


class ReexecTest(absltest.TestCase):
    def _run(self, env: dict[str, str], via_c: bool = False) -> tuple[str, int]:
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        count = os.path.join(tmp, "count")
        code = _SCRIPT.format(repo=REPO, count=count)
        if via_c:
            argv = [sys.executable, "-c", code]
        else:
            script = os.path.join(tmp, "script.py")
            with open(script, "w") as f:
                f.write(code)
            argv = [sys.executable, script]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
        with open(count) as f:
            runs = len(f.read().splitlines())
        return out.strip().split("TUNABLES=")[-1], runs

    def test_reexecutes_once_with_the_tunable(self):
        if not _host_supported():
            self.skipTest("this host has no glibc >= 2.35 with THP in 'madvise' mode")
        tunables, runs = self._run(_clean_env())
        self.assertEqual((tunables, runs), ("glibc.malloc.hugetlb=1", 2))

    def test_left_alone(self):
        # Opted out, already set, or code given with -c: one run, tunables unchanged.
        self.assertEqual(self._run(_clean_env(**{hostmem.OPT_OUT: "0"})), ("", 1))
        given = "glibc.malloc.hugetlb=0"
        self.assertEqual(self._run(_clean_env(GLIBC_TUNABLES=given)), (given, 1))
        self.assertEqual(self._run(_clean_env(), via_c=True), ("", 1))

    def test_the_tunable_removes_page_faults(self):
        # The reason for all this: with it, glibc's fresh large blocks fault in 2 MiB pages.
        if not _host_supported():
            self.skipTest("this host has no glibc >= 2.35 with THP in 'madvise' mode")
        defrag = hostmem.thp_mode("/sys/kernel/mm/transparent_hugepage/defrag")
        if defrag not in ("always", "madvise", "defer+madvise"):
            # Without compaction at fault time a huge page is there only if one happens to be.
            self.skipTest(f"THP defrag mode {defrag!r} does not compact for madvised memory")

        def faults(env):
            argv = [sys.executable, "-c", _FAULTS]
            return int(subprocess.run(argv, env=env, capture_output=True, check=True).stdout)

        plain = faults(_clean_env())
        huge = faults(hostmem.huge_page_env(_clean_env()))
        self.assertGreater(plain, 10_000)  # 64 MiB / 4 KiB pages = 16384
        self.assertLess(huge, plain / 4, (plain, huge))


if __name__ == "__main__":
    absltest.main()
