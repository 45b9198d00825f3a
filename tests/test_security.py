"""Hostile input (issue 23), each probe against the real component: `vaelens serve` running on loopback
(a child process, so its memory can be read from /proc), uvicorn with the command's own settings, and
run folders of real files, FIFOs and symbolic links read by `vaelens info` / `serve` in child processes.

Every bound below is stated with why it holds; docs/security.md lists what these probes measured.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _server import serving  # noqa: E402
from vaelens import VAE  # noqa: E402
from vaelens.cli import build_parser  # noqa: E402
from vaelens.commands import serve as serve_cmd  # noqa: E402
from vaelens.data import load_digits  # noqa: E402
from vaelens.webguard import Guard, server_config  # noqa: E402

MiB = 1 << 20
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _env():
    return dict(os.environ, VAELENS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    X = load_digits().X[:200]
    return VAE(latent_dim=2, hidden=(16,)).fit(X, epochs=1, seed=0).save(tmp_path_factory.mktemp("sec") / "run")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(run_dir, probe):
    """`vaelens serve RUN --host 127.1`: a loopback address spelled so that the old text test missed it.

    Asks for `probe` only to start that child first: both spend their first ~10 s importing torch, and on
    a shared machine two imports side by side finish sooner than one after the other.
    """
    proc = subprocess.Popen([sys.executable, "-m", "vaelens", "serve", str(run_dir), "--data", "digits",
                             "--host", "127.1", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if m:
                break
        assert m, "".join(out) + proc.stderr.read()
        assert not any("not loopback" in line for line in out)  # the old text test printed this for 127.1
        yield proc, int(m.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def _request(port, head: str, chunks=(), timeout=10.0):
    """Send a raw request head, then body chunks until the server answers or closes.

    Returns (status, body bytes sent, seconds). The body is generated chunk by chunk, so a "400 MB"
    request never exists in this process.
    """
    t0 = time.monotonic()
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode("latin-1"))
        for chunk in chunks:
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                break  # the server answered (or closed) before the body was sent
            try:
                s.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
            sent += len(chunk)
        try:
            reply = s.recv(4096)
        except ConnectionResetError:
            reply = b""
    status = int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else None
    return status, sent, time.monotonic() - t0


def _head(port, path="/api/draw", host=None, **headers):
    lines = [f"POST {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return "\r\n".join(lines) + "\r\n\r\n"


def _chunked(total, size=MiB):
    block = b"x" * size
    frame = f"{size:x}\r\n".encode() + block + b"\r\n"
    for _ in range(total // size):
        yield frame
    yield b"0\r\n\r\n"


# --- the live page ----------------------------------------------------------------------------------

def test_a_million_key_body_is_refused_at_once_while_info_answers(server):
    """A 10^6-key JSON body took 10-13 s and +1.2 GB to refuse, blocking every other request. Now the
    Content-Length alone answers it (413 before a byte is read), and sent chunked it is cut off at 64 KiB:
    the bound of 1 s is generous for a loopback round trip, and /api/info meanwhile answers as fast."""
    _, port = server
    body = ("{" + ",".join(f'"k{i}":0' for i in range(10 ** 6)) + "}").encode()
    assert len(body) > 10 * MiB
    frames = [f"{len(body[i:i + MiB]):x}\r\n".encode() + body[i:i + MiB] + b"\r\n" for i in range(0, len(body), MiB)]
    results = {}

    def post():
        results["length"] = _request(port, _head(port, Content_Type="application/json",
                                                 Content_Length=len(body)), [body[i:i + MiB] for i in
                                                                             range(0, len(body), MiB)])
        results["chunked"] = _request(port, _head(port, Content_Type="application/json",
                                                  Transfer_Encoding="chunked"), frames + [b"0\r\n\r\n"])

    thread = threading.Thread(target=post)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        thread.start()
        t0 = time.monotonic()
        info = c.get("/api/info")
        info_s = time.monotonic() - t0
        thread.join(30)
    assert info.status_code == 200 and info.json()["latent_dim"] == 2 and info_s < 1.0
    print(f"\n/api/info during the 10^6-key bodies: {info.status_code} in {info_s * 1000:.0f} ms")
    for kind in ("length", "chunked"):
        status, sent, seconds = results[kind]
        assert status == 413 and seconds < 1.0, (kind, results[kind])
        print(f"10^6-key body ({len(body) / 1e6:.1f} MB, {kind}): {status} in {seconds * 1000:.0f} ms, "
              f"{sent / 1e6:.1f} MB sent")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_oversized_body_gets_413_and_the_server_does_not_grow(server, framing):
    """A 400 MB text/plain body was read whole (+718 MB) before its 422. Now the server answers 413 and
    closes: its RSS may grow by the 64 KiB body bound plus uvicorn's 64 KiB read buffer and allocator
    noise, so 32 MiB is a bound far below the body's 400 MB; and the client cannot push more than the
    socket buffers hold (a few MB on loopback) after the answer, hence under 64 MiB sent."""
    proc, port = server
    total = 400 * 10 ** 6
    before = _rss_kib(proc.pid)
    if framing == "chunked":
        head, chunks = _head(port, Content_Type="text/plain", Transfer_Encoding="chunked"), _chunked(total)
    else:
        block = b"x" * MiB
        head = _head(port, Content_Type="text/plain", Content_Length=total)
        chunks = (block for _ in range(total // MiB))
    status, sent, seconds = _request(port, head, chunks)
    grown = (_rss_kib(proc.pid) - before) / 1024
    assert status == 413, (status, sent)
    assert sent < 64 * MiB and seconds < 5
    assert grown < 32, f"server RSS grew by {grown:.1f} MiB"
    print(f"\n400 MB text/plain ({framing}): {status} in {seconds * 1000:.0f} ms, {sent / 1e6:.1f} MB sent, "
          f"server RSS {before / 1024:.0f} MiB -> {before / 1024 + grown:.0f} MiB")


@pytest.mark.parametrize("host,status", [("evil.example", 400), ("evil.example:{port}", 400),
                                         ("127.0.0.1:{port}", 200), ("localhost:{port}", 200),
                                         ("127.1:{port}", 200), ("127.0.0.1:1", 400)])
def test_host_127_1_keeps_the_host_allowlist(server, host, status):
    """`--host 127.1` binds loopback: a page on evil.example that rebinds its name to 127.0.0.1 still
    sends `Host: evil.example` and gets 400; the server's own names get 200."""
    _, port = server
    r = httpx.get(f"http://127.0.0.1:{port}/api/info", headers={"Host": host.format(port=port)}, timeout=10)
    assert r.status_code == status, r.text


@pytest.fixture(scope="module")
def served(run_dir):
    """Start the command's own setup (`serve.prepare`: bind, load, allowlist, app) for a --host spelling, and
    serve it on uvicorn with the command's settings in a thread."""
    import contextlib

    import uvicorn

    @contextlib.contextmanager
    def start(*extra):
        args = build_parser().parse_args(["serve", str(run_dir), "--data", "digits", "--port", "0", *extra])
        sock, app, lines = serve_cmd.prepare(args)
        server = uvicorn.Server(server_config(app))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.02)
        try:
            yield sock.getsockname()[:2], lines
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()

    return start


@pytest.mark.parametrize("spelling", ["LOCALHOST", "127.0.0.2", "::1"])
def test_every_loopback_spelling_keeps_the_host_check(served, spelling):
    """Loopback is decided from the bound socket, so these keep the allowlist (they all switched it off)."""
    if spelling == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        ctx = served("--host", spelling)
        (addr, port), lines = ctx.__enter__()
    except Exception as e:  # an IPv6-less sandbox cannot bind ::1
        if spelling == "::1" and "cannot listen" in str(e):
            pytest.skip(str(e))
        raise
    try:
        assert not any("not loopback" in line for line in lines)
        url = f"http://{'[' + addr + ']' if ':' in addr else addr}:{port}/api/info"
        literal = f"[{addr}]" if ":" in addr else addr
        assert httpx.get(url, headers={"Host": "evil.example"}, timeout=10).status_code == 400
        assert httpx.get(url, headers={"Host": f"evil.example:{port}"}, timeout=10).status_code == 400
        assert httpx.get(url, headers={"Host": f"{literal}:{port}"}, timeout=10).status_code == 200
        assert httpx.get(url, headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200
    finally:
        ctx.__exit__(None, None, None)


def test_ipv4_mapped_and_non_loopback_addresses():
    """The allowlist for an address bound on purpose: the machine's names, the address, --allow-host; never
    'any Host'. An IPv4-mapped loopback socket counts as loopback."""
    import ipaddress

    sock = serve_cmd.listen("::ffff:127.0.0.1", 0) if socket.has_ipv6 else None
    if sock is not None:
        with sock:
            assert serve_cmd.bound_address(sock) == ipaddress.ip_address("127.0.0.1")
    lan = serve_cmd.allowed_hosts("192.0.2.7", ipaddress.ip_address("192.0.2.7"), ["Pages.Example."])
    assert "192.0.2.7" in lan and "pages.example" in lan and socket.gethostname().lower() in lan
    assert "evil.example" not in lan and "127.0.0.2" not in lan
    wild = serve_cmd.allowed_hosts("0.0.0.0", ipaddress.ip_address("0.0.0.0"))
    assert "localhost" in wild and "127.0.0.1" in wild
    msg = serve_cmd._exposure(ipaddress.ip_address("0.0.0.0"), 8000, wild)
    assert "every interface" in msg and "anyone who can reach this machine on port 8000" in msg


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_cross_site_simple_posts_are_refused(server, ctype):
    """A page elsewhere can make the browser POST these to 127.0.0.1 without a CORS preflight (its Host
    header is then ours, so the Host check passes): they get 415 before the app parses anything."""
    _, port = server
    headers = {"Origin": "http://evil.example"} | ({"Content-Type": ctype} if ctype else {})
    r = httpx.post(f"http://127.0.0.1:{port}/api/draw", content=b'{"index": 0, "n": 1}', headers=headers, timeout=10)
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert "access-control-allow-origin" not in r.headers


def test_security_headers_and_slow_clients(digits_vae):
    """The page's headers (the CSP allows only the page's own script, style, fetches and its data: favicon);
    uvicorn closes a connection whose headers are not complete within the header deadline (it has no such
    timeout of its own), and the Guard answers 408 to a body that does not arrive within its deadline."""
    from vaelens.data import Dataset
    from vaelens.serve import create_app

    vae, X = digits_vae
    app = create_app(vae, Dataset(X=X, image_shape=(8, 8), name="digits"), allowed_hosts=["127.0.0.1"])
    with serving(app, header_timeout=1.0) as url:
        r = httpx.get(url + "/", timeout=10)
        assert r.status_code == 200
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
        assert r.headers["referrer-policy"] == "no-referrer"
        port = int(url.rsplit(":", 1)[1])
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
            assert s.recv(100) == b""  # closed by the server
        closed = time.monotonic() - t0
        assert 0.9 < closed < 5
        print(f"\nheaders never completed: closed after {closed:.2f} s (header_timeout 1 s here, 10 s in serve)")

    async def echo(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    with serving(Guard(echo, body_timeout=0.5)) as url:
        port = int(url.rsplit(":", 1)[1])
        status, _, seconds = _request(port, _head(port, Content_Length=100), [b"x" * 10], timeout=10)
        assert status == 408 and seconds < 5
        print(f"body stalled after 10 of 100 bytes: {status} after {seconds:.2f} s (body_timeout 0.5 s here)")


# --- run folders ------------------------------------------------------------------------------------

def _hostile_folders(good: Path, root: Path) -> dict:
    """Copies of a good run, each with one hostile change (most without checksums.json, as the issue's)."""
    cfg = json.loads((good / "config.json").read_text())
    text = json.dumps(cfg)
    folders = {}

    def folder(name):
        d = root / name
        shutil.copytree(good, d)
        (d / "checksums.json").unlink()
        folders[name] = d
        return d

    def model(name, **changes):
        c = json.loads(text)
        c["model"].update(changes)
        (folder(name) / "config.json").write_text(json.dumps(c))

    model("hidden 20000x20000", hidden=[20000, 20000])
    model("100,000 layers", hidden=[16] * 100_000)
    model("latent_dim 10^12", latent_dim=10 ** 12)
    model("10^12 parameters", hidden=[10 ** 6, 10 ** 6])
    model("conv channels", arch="conv", image_shape=[8, 8], conv_channels=[10 ** 7])
    for name, target in [("config.json", "/dev/zero"), ("model.safetensors", "/dev/zero")]:
        d = folder(f"{name} -> {target}")
        (d / name).unlink()
        os.symlink(target, d / name)
    for name in ("config.json", "model.safetensors"):
        d = folder(f"{name} a FIFO")
        (d / name).unlink()
        os.mkfifo(d / name)
    (folder("config.json a folder") / "config.json").unlink()
    (root / "config.json a folder" / "config.json").mkdir()
    (folder("deep nesting") / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder("5,000-digit integer") / "config.json").write_text(text.replace('"latent_dim": 2', '"latent_dim": 1'
                                                                            + "0" * 5000))
    (folder("NaN") / "config.json").write_text(text.replace('"beta": 1.0', '"beta": NaN'))
    (folder("duplicate key") / "config.json").write_text(text[:-1] + ', "version": 1}')
    (folder("top level a list") / "config.json").write_text("[" + text + "]")
    with open(folder("config.json of 1 GiB") / "config.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: costs no disk
    (folder("weights header of 1 TB") / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    return folders


# `python -m vaelens ARGS` once per folder, in one interpreter (runpy runs vaelens/__main__.py as -m does),
# so torch is imported once: each row's time and peak-RSS growth are the folder's own work.
_PROBE = textwrap.dedent("""
    import io, json, resource, runpy, sys, time, contextlib, traceback
    import vaelens.cli, vaelens.api  # the timing below is the checks, not torch's first import (commands defer it)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name, argv in json.loads(sys.argv[1]):
        err, t0 = io.StringIO(), time.monotonic()
        sys.argv = ["vaelens", *argv]
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_module("vaelens", run_name="__main__", alter_sys=True)
                rc = "returned"
            except SystemExit as e:
                rc = e.code
            except BaseException:
                rc, _ = "raised", traceback.print_exc()
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        print(json.dumps([name, rc, time.monotonic() - t0, grown, err.getvalue()]), flush=True)
""")


@pytest.fixture(scope="module")
def probe(run_dir, tmp_path_factory):
    """The hostile folders, and the child probing them (started here, read by the test below)."""
    folders = _hostile_folders(run_dir, tmp_path_factory.mktemp("hostile"))
    jobs = [[name, ["info", str(d)]] for name, d in folders.items()]
    jobs += [[f"serve: {name}", ["serve", str(folders[name]), "--data", "digits", "--port", "0"]]
             for name in ("model.safetensors a FIFO", "hidden 20000x20000")]
    proc = subprocess.Popen([sys.executable, "-c", _PROBE, json.dumps(jobs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    yield proc, jobs
    if proc.returncode is None and proc.poll() is None:
        proc.kill()
        proc.wait()


def test_hostile_run_folders_give_one_line_and_exit_2(probe):
    """Each folder used to build a 3.3 GB model, exhaust memory, hang on the FIFO or end in a traceback.

    A child process runs `python -m vaelens info RUN` on every folder (and `serve` on two), timing each and
    reading its peak RSS. Bounds: 2 s per folder for info (the checks stat, read at most 16 MiB of
    config.json or a safetensors header, and build the model on the meta device, which allocates nothing;
    serve's first row also imports the web stack, so 10 s), 64 MiB of peak-RSS growth per folder (the
    largest allowed read, 16 MiB, plus what parsing it may take), and 1 GiB for the child's whole peak RSS
    from wait4 (torch's import is ~500 MB of it; the /dev/zero read it replaces grew without end).
    """
    probe, jobs = probe
    rc, peak, out, err = _wait_with_rusage(probe, timeout=120)  # a hang would end in the kill at 120 s
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r[0] for r in rows] == [j[0] for j in jobs]
    for name, rc, seconds, grown, stderr in rows:
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and "Traceback" not in stderr, (name, rc, stderr)
        assert re.match(r"vaelens (info|serve): error: ", lines[0]) and len(lines[0]) < 400, (name, lines[0])
        assert seconds < (10.0 if name.startswith("serve") else 2.0) and grown < 64, (name, seconds, grown)
        print(f"{name:32s} {seconds * 1000:7.1f} ms  +{grown:5.1f} MiB  {lines[0][:150]}")
    assert peak < 1024, f"peak RSS {peak:.0f} MiB"
    print(f"probe child: peak RSS {peak:.0f} MiB")


def _wait_with_rusage(proc, timeout):
    """(exit status, peak RSS in MiB, stdout, stderr) of one child; the RSS from wait4 is its own figure,
    not the maximum over all children. The child is killed after `timeout` seconds."""
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        out, err = proc.stdout.read(), proc.stderr.read()  # small: one line per folder
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, out, err


def test_a_good_run_still_loads_and_checksums_still_catch_a_swap(run_dir, tmp_path):
    """The checks refuse nothing vaelens wrote, and a weights file replaced by a same-shaped one still fails
    its checksum (the header check bounds the work; checksums.json still finds alterations)."""
    from vaelens import checkpoint as ck
    from vaelens.errors import CheckpointError

    cfg, module = ck.load_model(run_dir)
    assert cfg.model.latent_dim == 2 and isinstance(ck.read_summary(run_dir), dict)
    other = tmp_path / "run"
    shutil.copytree(run_dir, other)
    state = {k: v + 1 for k, v in module.state_dict().items()}
    ck.save_tensors(other / "model.safetensors", state)
    with pytest.raises(CheckpointError, match="checksum"):
        ck.load_model(other)
    assert np.isfinite(VAE.load(run_dir).encode(load_digits().X[:5]).mu).all()
