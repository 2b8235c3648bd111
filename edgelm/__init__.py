"""edgelm: export language models for devices and run them offline through one API."""

from edgelm._version import __version__
from edgelm.runtime import load


def export(source, out, **options):
    """Export a source model folder to a validated artifact (needs the `edgelm[export]` extra)."""
    from edgelm.export import export as _export
    from edgelm.export.options import ExportOptions

    return _export(source, out, ExportOptions(**options))


__all__ = ["__version__", "export", "load"]
