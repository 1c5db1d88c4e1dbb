"""A TCP proxy for fault tests: put it between a client and a real server (e.g. the moto S3 server)
and make the server look down for a while (stdlib only, threads).

    with FlakyProxy("127.0.0.1", moto_port) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint_url)
        proxy.outage(6.0)   # returns at once; the endpoint is down for 6 s, then up again
        ...
        proxy.down(); ...; proxy.up()

- ``port``: the port it listens on (127.0.0.1, a free one); ``endpoint_url``: ``http://127.0.0.1:<port>``.
- ``down()``: every open connection is reset (both sides closed, RST to the client), and every new
  connection is accepted and reset at once, until ``up()``. Clients see "connection reset" /
  "connection closed" errors, as when a server process dies and its port is reused by a dead listener.
- ``outage(seconds)``: ``down()`` now and ``up()`` after ``seconds`` on a timer thread.
- ``connections``: connections accepted so far (those reset while down included);
  ``refused``: of these, the ones reset at once because the proxy was down.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

__all__ = ["FlakyProxy"]

_BUF = 65536


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with an RST (SO_LINGER 0), not an orderly FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class FlakyProxy:
    """TCP proxy 127.0.0.1:``port`` -> ``target_host``:``target_port`` that can be taken down."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: set[tuple[socket.socket, socket.socket]] = set()
        self._down = False
        self._stopping = threading.Event()
        self._timers: list[threading.Timer] = []
        self._thread: threading.Thread | None = None
        self.connections = 0
        self.refused = 0

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def is_down(self) -> bool:
        return self._down

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> FlakyProxy:
        if self._thread is None:
            self._listener.listen(128)
            self._thread = threading.Thread(target=self._accept_loop, name=f"flaky-proxy-{self.port}",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        for t in self._timers:
            t.cancel()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._listener.close()
        self._close_all()

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------------------------
    def down(self) -> None:
        """Reset every open connection and every new one until :meth:`up`."""
        with self._lock:
            self._down = True
        self._close_all()

    def up(self) -> None:
        with self._lock:
            self._down = False

    def outage(self, seconds: float) -> threading.Timer:
        """``down()`` now, ``up()`` after ``seconds`` (a timer thread); returns the timer at once."""
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()
        return timer

    # -- internals ----------------------------------------------------------------------------
    def _close_all(self) -> None:
        with self._lock:
            pairs, self._open = list(self._open), set()
        for client, upstream in pairs:
            _reset(client)
            _reset(upstream)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)
            except (OSError, ValueError):
                return
            if not ready:
                continue
            try:
                client, _ = self._listener.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
                down = self._down
                if down:
                    self.refused += 1
            if down:
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        pair = (client, upstream)
        with self._lock:
            if self._down or self._stopping.is_set():
                _reset(client)
                _reset(upstream)
                return
            self._open.add(pair)
        try:
            socks = [client, upstream]
            while not self._stopping.is_set():
                ready, _, _ = select.select(socks, [], [], 0.2)
                for s in ready:
                    data = s.recv(_BUF)
                    if not data:
                        return
                    (upstream if s is client else client).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            with self._lock:
                self._open.discard(pair)
            for s in pair:
                with contextlib.suppress(OSError):
                    s.close()
