"""edgelm: export language models for devices and run them offline through one API.

    edgelm.export(source, out, quant="int8")   # the export side (needs the `edgelm[export]` extra)
    edgelm.load(artifact)                      # the runtime side (no torch)
"""

from edgelm import export  # a callable package: edgelm.export(source, out, **options)
from edgelm._version import __version__
from edgelm.runtime import load

__all__ = ["__version__", "export", "load"]
