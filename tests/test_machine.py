"""The executing CPU's features: CPUID (through numpy) over /proc/cpuinfo where they disagree."""

from __future__ import annotations

import pytest

from edgelm import machine

ZEN4 = {"AVX2": True, "FMA3": True, "F16C": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}
ZEN2 = {"AVX2": True, "FMA3": True, "F16C": True}
HOST_FLAGS = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni"}


@pytest.mark.parametrize("probed, expected", [
    (ZEN4, HOST_FLAGS),  # CPUID agrees with /proc/cpuinfo: avx_vnni (unknown to numpy) is kept
    (ZEN2, {"avx2", "fma", "f16c"}),  # an emulated or masked CPU: the host's extras are not this CPU's
    (None, HOST_FLAGS),  # no probe: /proc/cpuinfo as listed
])
def test_features_are_the_executing_cpus(monkeypatch, probed, expected):
    monkeypatch.setattr(machine, "_numpy_features", lambda: probed)
    assert machine._as_executed(set(HOST_FLAGS)) == expected


def test_vnni_follows_the_executing_cpu(monkeypatch):
    monkeypatch.setattr(machine, "_numpy_features", lambda: ZEN2)
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "flags\t: " + " ".join(sorted(HOST_FLAGS)) + "\n")
    facts = machine.machine_facts()
    assert facts["isa"] == ["avx2", "f16c", "fma"] and facts["vnni"] is False


def test_this_machine_reports_what_numpy_dispatches_on():
    import platform

    probed = machine._numpy_features()
    if probed is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("numpy's CPU probe is checked against x86 names")
    isa = machine.machine_facts()["isa"]
    assert ("avx2" in isa) == bool(probed.get("AVX2"))
    assert ("avx512_vnni" in isa) == bool(probed.get("AVX512VNNI"))
