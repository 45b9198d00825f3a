"""`vaelens serve`: explore a model's latent space in a local web page (needs fastapi and uvicorn)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from .. import webguard
from ..errors import VaelensError
from . import _common as common
from .render import Result

NAME = "serve"
# Names that always mean this machine's loopback: no one else's DNS can claim them for a rebinding attack.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


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
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="with a non-loopback --host: a further name the page may be opened under (repeatable); "
                        "the machine's own names and the bound address are always accepted")
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


def bound_address(sock: socket.socket):
    """The `ipaddress` address a socket is bound to (an IPv4-mapped IPv6 address as its IPv4 one)."""
    ip = ipaddress.ip_address(str(sock.getsockname()[0]).split("%", 1)[0])  # drop an IPv6 scope id
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def _literal(ip) -> str:
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _machine_names() -> set:
    """This machine's host names and the addresses they resolve to (best effort, no network needed)."""
    names = set()
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
            try:
                for *_, addr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
                    names.add(_literal(ipaddress.ip_address(addr[0].split("%", 1)[0])))
            except (OSError, UnicodeError, ValueError):
                pass
    return names


def allowed_hosts(typed: str, ip, extra=()) -> list:
    """Host names the server answers, decided from the address actually bound (`ip`), not from --host's text.

    Loopback (any spelling: 127.1, LOCALHOST, 127.0.0.2, ::1): the loopback names and what was typed.
    Otherwise the bound address and the machine's own names; bound to every interface (0.0.0.0, ::)
    also the loopback names, since loopback then reaches the server too. Always `extra` (--allow-host).
    """
    names = {_literal(ip), *LOOPBACK_NAMES} if ip.is_loopback or ip.is_unspecified else {_literal(ip)}
    text = typed.strip().lower().rstrip(".")
    names.add(f"[{text}]" if ":" in text and not text.startswith("[") else text)
    if not ip.is_loopback:
        names |= _machine_names()
    names |= {webguard.split_host(h)[0] or h.strip().lower() for h in extra}
    names.discard("")
    return sorted(names)


@dataclass
class ServeResult(Result):
    host: str
    port: int

    def to_dict(self) -> dict:
        return {"host": self.host, "port": self.port, "stopped": True}

    def lines(self):
        return ["stopped"]


def prepare(args):
    """Everything `run` does before serving: (listening socket, app, lines to print).

    The socket is bound first, so a busy port is reported before the model and data are loaded.
    """
    from .. import serve as serve_mod
    from ..latentview import prior_name

    if args.max_points < 1:
        raise VaelensError(f"--max-points must be >= 1, got {args.max_points}")
    sock = listen(args.host, args.port)
    try:
        vae, ds = common.load_run_and_data(args)
        # Only Host headers naming this server are answered, whatever the address: a web page elsewhere
        # cannot reach the API through DNS rebinding. Loopback is decided from the bound socket.
        ip, port = bound_address(sock), sock.getsockname()[1]
        hosts = allowed_hosts(args.host, ip, args.allow_host)
        app = serve_mod.create_app(vae, ds, max_points=args.max_points, seed=args.seed,
                                   allowed_hosts=hosts, port=port)
    except BaseException:
        sock.close()
        raise
    shown = _literal(ip) if ip.is_loopback or not ip.is_unspecified else args.host
    m = vae.config_.model
    lines = [f"vaelens serve: {ds.name}, {ds.n} samples, latent dimension {m.latent_dim}, "
             f"{m.posterior} q(z|x), prior {prior_name(m)}"]
    if not ip.is_loopback:
        lines.append(_exposure(ip, port, hosts))
    lines.append(f"open http://{shown}:{port}/  (Ctrl-C to stop)")
    return sock, app, lines


def run(args) -> ServeResult:
    from .. import serve as serve_mod

    serve_mod.require_deps()  # names the install command if fastapi or uvicorn is missing
    sock, app, lines = prepare(args)
    port = sock.getsockname()[1]
    try:
        # printed as it happens: the address must be on screen while the server runs
        print("\n".join(lines), flush=True)
        server = webguard.server(app)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled once it has shut down
    finally:
        sock.close()
    return ServeResult(args.host, port)


def _exposure(ip, port: int, hosts) -> str:
    where = f"every interface ({ip})" if ip.is_unspecified else f"{ip}, not loopback"
    return (f"listening on {where}: anyone who can reach this machine on port {port} can open the page and "
            f"read the data through its API (no password, no TLS); it answers only these Host names: "
            f"{', '.join(hosts)} (add one with --allow-host NAME)")
