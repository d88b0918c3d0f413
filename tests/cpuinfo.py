"""The CPU's feature flags as the kernel reports them (/proc/cpuinfo), read independently of sparsekern's own probe,
so tests can choose which kernel paths this machine can run without trusting the code under test."""

from __future__ import annotations


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FLAGS = cpu_flags()
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= FLAGS
