"""`vaelens serve`: explore a model's latent space in a local web page (needs fastapi and uvicorn)."""

from __future__ import annotations

import socket
from dataclasses import dataclass

from .. import serve as serve_mod
from ..errors import VaelensError
from . import _common as common
from .render import Result

NAME = "serve"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_parser(subparsers):
    p = common.add_parser(
        subparsers, NAME, help="explore a model's latent space in a local web page",
        description="Serve a local web page: the latent map, one sample's posterior and draws "
                    "of z, the decoder's output under the pointer, the aggregate posterior. A binarized "
                    "run is shown the data binarized once with --seed.",
        epilog="examples:\n  vaelens serve runs/digits-...\n"
               "  vaelens serve runs/mnist-... --data mnist --data-dir ~/data/mnist --port 8080\n")
    common.add_run_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the page to your network")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--max-points", type=int, default=5000, help="larger data sets are mapped as a seeded subsample")
    p.add_argument("--seed", type=int, default=0, help="seed of that subsample (and a binarized run's binarization)")
    return p


def listen(host: str, port: int) -> socket.socket:
    """A listening socket bound before the server starts, so the printed address is the real one."""
    if not 0 <= port <= 65535:
        raise VaelensError(f"--port must be in 0..65535, got {port}")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise VaelensError(f"cannot listen on {host!r}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise VaelensError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class ServeResult(Result):
    host: str
    port: int

    def to_dict(self) -> dict:
        return {"host": self.host, "port": self.port, "stopped": True}

    def lines(self):
        return ["stopped"]


def run(args) -> ServeResult:
    serve_mod.require_deps()
    import uvicorn  # optional dependency (vaelens[serve]); require_deps named the install if missing

    if args.max_points < 1:
        raise VaelensError(f"--max-points must be >= 1, got {args.max_points}")
    # Bound first: a busy port is reported before the model and data are loaded.
    sock = listen(args.host, args.port)
    try:
        vae, ds = common.load_run_and_data(args)
        # On loopback only loopback Host headers are answered: a web page elsewhere cannot reach
        # the API through DNS rebinding.
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if args.host in _LOOPBACK else None
        app = serve_mod.create_app(vae, ds, max_points=args.max_points,
                                   seed=args.seed, allowed_hosts=hosts)
        port = sock.getsockname()[1]
        shown = f"[{args.host}]" if ":" in args.host else args.host
        # printed as it happens: the address must be on screen while the server runs
        print(f"vaelens serve: {ds.name}, {ds.n} samples, latent dimension {vae.config_.model.latent_dim}")
        if hosts is None:
            print(f"listening on {args.host}, not loopback: anyone who can reach this machine can open the page")
        print(f"open http://{shown}:{port}/  (Ctrl-C to stop)", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled once it has shut down
    finally:
        sock.close()
    return ServeResult(args.host, port)
