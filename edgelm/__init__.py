"""edgelm: export language models for devices and run them offline through one API.

    edgelm.export(source, out, quant="int8")   # the export side (needs the `edgelm[export]` extra)
    edgelm.load(artifact)                      # the runtime side (no torch)
    edgelm.verify(artifact)                    # the artifact's reference set, rerun on this machine
"""

from typing import Any

from edgelm import export  # a callable package: edgelm.export(source, out, **options)
from edgelm._version import __version__
from edgelm.runtime import load

__all__ = ["__version__", "export", "load", "verify"]


def verify(path: Any, threads: int | None = None) -> Any:
    """Run an artifact's reference set through the runtime here: a result with .passed, .checks, .machine."""
    from edgelm.reference.verify import verify as run_verify  # numpy and the backends load only when used

    return run_verify(path, threads=threads)
