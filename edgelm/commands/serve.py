"""`edgelm serve`: load artifacts and answer OpenAI's protocol over HTTP (uvicorn on the ASGI app)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from pathlib import Path

import click

from edgelm.errors import UsageError
from edgelm.safe_text import printable


def model_paths(artifacts: Sequence[str | Path], names: Sequence[str]) -> dict[str, Path]:
    """Ids to artifact paths: a library name stays the id, a path gets its folder's name, and
    `--name NAME=ARTIFACT` gives any of them NAME. Nothing given: every model in the library."""
    from edgelm.library import named

    if not artifacts and not names:
        return library_models()
    renamed: dict[Path, str] = {}
    models: dict[str, Path] = {}
    for spec in names:
        name, sep, ref = spec.partition("=")
        if not sep or not name or not ref:
            raise UsageError(f"--name takes NAME=ARTIFACT, got {spec!r}")
        path = named(ref)[1]
        renamed[path.resolve()] = name
        models[name] = path
    for ref in artifacts:
        library_name, path = named(ref)
        if path.resolve() in renamed:
            continue
        model_id = library_name or default_id(path)
        if model_id in models:
            raise UsageError(f"two models would have the id {model_id!r}; give one another with "
                             f"--name NAME={ref}")
        models[model_id] = path
    return models


def library_models() -> dict[str, Path]:
    """Every model in the library by its name; a missing one is skipped with a line saying so."""
    from edgelm.library import library_home, read_index

    models: dict[str, Path] = {}
    for name, entry in sorted(read_index().items()):
        if entry.missing:
            click.echo(printable(f"warning: not serving {name}: {entry.path} is gone "
                                 f"(`edgelm rm {name}` removes the entry)"), err=True)
            continue
        models[name] = Path(entry.path)
    if not models:
        raise UsageError(f"give at least one artifact to serve; the library ({library_home()}) has no model "
                         "to serve (`edgelm add PATH` registers one)")
    return models


def default_id(path: Path) -> str:
    from edgelm.serve.app import default_id as folder_id

    return folder_id(path)


def is_loopback_bind(host: str) -> bool:
    """localhost or a loopback address; any other host name may resolve to anything."""
    from edgelm.serve.security import is_loopback_address

    return host == "localhost" or is_loopback_address(host.strip("[]"))


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before loading anything is announced, so a busy port is one line, not a log dump."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_serve(artifacts: Sequence[Path], names: Sequence[str], host: str, port: int, api_key: str | None,
              cors_origins: Sequence[str], max_queue: int, allow_remote: bool, device: dict, debug: bool) -> None:
    try:
        import uvicorn

        from edgelm.serve.app import create_app
        from edgelm.serve.runner import uvicorn_config
    except ImportError as err:
        raise UsageError(f"{err.name} is not installed; serving needs `pip install edgelm[serve]`") from None

    loopback = is_loopback_bind(host)
    if not loopback and not api_key:
        if not allow_remote:
            raise UsageError(f"binding {host} lets other machines in; give --api-key (or EDGELM_API_KEY), "
                             "or --allow-unauthenticated-remote if you really mean it")
        click.echo(f"warning: serving on {host} without an API key: anyone who can reach this machine can "
                   "use the models", err=True)
    models = model_paths(artifacts, names)
    sock = listening_socket(host, port)
    logging.basicConfig(format="%(levelname)s:     %(message)s")
    logging.getLogger("edgelm.serve").setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        app = create_app(models, api_key=api_key, cors_origins=cors_origins, max_queue=max_queue,
                         loopback_only=loopback, **device)
        bound_port = sock.getsockname()[1]
        shown = f"[{host.strip('[]')}]" if ":" in host else host
        for model_id, served in app.models.items():
            click.echo(f"serving {model_id!r} ({', '.join(served.endpoints)})", err=True)
        click.echo(f"OpenAI base URL: http://{shown}:{bound_port}/v1" + (" (API key required)" if api_key else ""),
                   err=True)
        click.echo(f"chat page: http://{shown}:{bound_port}/", err=True)
        uvicorn.Server(uvicorn_config(app, log_level="debug" if debug else "info")).run(sockets=[sock])
    finally:
        sock.close()
