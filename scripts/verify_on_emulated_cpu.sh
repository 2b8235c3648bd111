#!/usr/bin/env bash
# `edgelm verify` on an emulated CPU, to see artifacts as another machine's kernels run them.
#
#   ./scripts/verify_on_emulated_cpu.sh ARTIFACT...              # AVX2 without VNNI (AMD Zen 2)
#   QEMU_CPU=Haswell ./scripts/verify_on_emulated_cpu.sh ARTIFACT...
#
# qemu's user mode (Debian package qemu-user) runs this machine's Python under a CPU model that
# lacks AVX-512 and VNNI, so onnxruntime and llama.cpp pick the kernels such a laptop would. It is
# tens of times slower than native: use it on small artifacts or be patient. Exits as verify does.
set -euo pipefail
artifacts=()
for artifact in "$@"; do artifacts+=("$(realpath -m -- "$artifact")"); done  # before the cd below
cd "$(dirname "$0")/.."
command -v qemu-x86_64 >/dev/null || { echo "error: qemu-x86_64 not found (apt-get install qemu-user)" >&2; exit 1; }
[ "$#" -gt 0 ] || { echo "usage: $0 ARTIFACT..." >&2; exit 2; }
python=$(readlink -f .venv/bin/python)
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
status=0
for artifact in "${artifacts[@]}"; do
    echo "== $artifact on an emulated ${QEMU_CPU:-EPYC-Rome}"
    # qemu warns once per CPU feature its emulator lacks (pcid, x2apic, ...): not about the artifact
    PYTHONPATH="$site:$PWD" qemu-x86_64 -cpu "${QEMU_CPU:-EPYC-Rome}" "$python" -m edgelm.cli verify "$artifact" \
        2> >(grep -v "^qemu-x86_64: warning: TCG doesn't support" >&2) || status=1
done
exit $status
