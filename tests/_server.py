"""A uvicorn server in a thread for the serve tests, configured as `vaelens serve` configures it."""

import contextlib
import socket
import threading
import time

import uvicorn

from vaelens.webguard import server_config


@contextlib.contextmanager
def serving(app, host="127.0.0.1", **config):
    """Run `app` on uvicorn in a thread, on a free port of `host`; yields its base URL.

    `config` overrides `webguard.server_config`'s settings (e.g. a short header_timeout).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(16)
    server = uvicorn.Server(server_config(app, **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
