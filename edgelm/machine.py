"""The facts of this machine that decide which kernels run: CPU, instruction sets, backends, threads.

A quantized model's numbers depend on the kernel path onnxruntime or llama.cpp picks (x86 without
VNNI sums int8 products in 16 bits, for one), so an export records these facts of the machine
that proved it, and `edgelm verify` prints them beside this machine's. Cheap: no backend is
imported (versions come from package metadata); numpy, already loaded by the runtime, tells which
features the executing CPU reports.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from typing import Any

# kernel-selecting features, by the names /proc/cpuinfo spells them (x86 "flags", arm "Features")
X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")
ARM_FEATURES = ("neon", "asimd", "dotprod", "asimddp")
VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "asimddp")  # 32-bit int8 dot sums
MAX_CPUINFO_BYTES = 4 << 20


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    """This machine as the runtime sees it; `threads`: the count asked for (None: edgelm's default)."""
    from edgelm.runtime.device import thread_count

    cpuinfo = _cpuinfo()
    isa = _isa(cpuinfo)
    return {
        "cpu": _cpu_model(cpuinfo),
        "arch": platform.machine() or None,
        "os": platform.system() or None,
        "isa": isa,
        "vnni": any(f in isa for f in VNNI_FEATURES),
        "onnxruntime": _version("onnxruntime"),
        "llama_cpp_python": _version("llama-cpp-python"),
        "threads": thread_count(threads),
    }


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo", "rb") as handle:
            return handle.read(MAX_CPUINFO_BYTES).decode("utf-8", "replace")
    except OSError:
        return ""


def _first_value(cpuinfo: str, keys: tuple[str, ...]) -> str | None:
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in keys and value.strip():
            return value.strip()
    return None


def _cpu_model(cpuinfo: str) -> str | None:
    found = _first_value(cpuinfo, ("model name", "hardware", "cpu model"))
    if found:
        return found
    if platform.system() == "Darwin":
        return _sysctl("machdep.cpu.brand_string")
    return platform.processor() or None


def _isa(cpuinfo: str) -> list[str]:
    flags = set((_first_value(cpuinfo, ("flags", "features")) or "").split()) & set(X86_FEATURES + ARM_FEATURES)
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        flags |= {"neon", "asimd"}  # every Apple silicon core has them
        if _sysctl("hw.optional.arm.FEAT_DotProd") == "1":
            flags.add("dotprod")
    return sorted(_as_executed(flags))


def _as_executed(listed: set[str]) -> set[str]:
    """The features of the CPU this process runs on, by CPUID where numpy has read it.

    /proc/cpuinfo describes the host, which is not always the CPU that executes: under an emulator
    or a hypervisor that masks features, only CPUID tells what the kernels will find. numpy reads
    CPUID at import (the same probe its own dispatch uses); for the features it knows its answer
    wins, and the ones it does not know (avx_vnni, amx) are kept from /proc/cpuinfo only when the
    two agree on everything else.
    """
    probed = _numpy_features()
    if probed is None:
        return listed
    known = {name for name, _ in NUMPY_FEATURES}
    present = {name for name, numpy_name in NUMPY_FEATURES if probed.get(numpy_name)}
    agree = (listed & known) == present
    return present | (listed - known if agree else set())


# edgelm's feature names and numpy's for them (numpy/_core/src/common/npy_cpu_features.h)
NUMPY_FEATURES = (("avx2", "AVX2"), ("fma", "FMA3"), ("f16c", "F16C"), ("avx512f", "AVX512F"),
                  ("avx512bw", "AVX512BW"), ("avx512_vnni", "AVX512VNNI"), ("asimd", "ASIMD"),
                  ("asimddp", "ASIMDDP"), ("neon", "NEON"))


def _numpy_features() -> dict[str, bool] | None:
    try:  # a private table of numpy's; absent or renamed in some version: fall back to /proc/cpuinfo
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:
        return None
    return dict(__cpu_features__) if isinstance(__cpu_features__, dict) else None


def _sysctl(name: str) -> str | None:
    try:
        done = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
