"""An object store that goes away: a TCP proxy on 127.0.0.1 in front of the loopback S3 server.

moto_server keeps its objects in memory, so stopping it would lose them; MinIO restarting keeps them on
disk. The proxy plays the restart: while it is down, every open connection is cut and new ones are
refused, and the objects behind it stay. An outage starts when a request matching a pattern passes
(that request is cut too), so a test chooses the moment: a checkpoint upload, a shard read, an index
publish.
"""

from __future__ import annotations

import re
import socket
import threading
import time


class OutageProxy:
    """Forwards 127.0.0.1:<port> to `upstream_port`; `outage_on(pattern, seconds)` arms an outage."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._trigger: tuple[re.Pattern, float | None] | None = None
        self._listener: socket.socket | None = None
        self.port = self._listen(0)
        self.outages: list[dict] = []  # each: the request that started it, when, and for how long

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def outage_on(self, pattern: bytes, seconds: float | None) -> None:
        """Go down when a request whose bytes match `pattern` (a regex) passes: for `seconds`, or for
        good when None."""
        self._trigger = (re.compile(pattern, re.MULTILINE), seconds)

    def down(self, seconds: float | None = None, request: bytes = b"") -> None:
        self._cut()
        self.outages.append({"request": request[:120], "at": time.monotonic(), "seconds": seconds})
        if seconds is not None:
            threading.Timer(seconds, self.up).start()

    def up(self) -> None:
        """Listen again on the same port; a socket that happens to hold it (an outgoing connection's
        ephemeral port, say) delays that by a moment, as a restarting server's bind would."""
        deadline = time.monotonic() + 10
        while True:
            try:
                self._listen(self.port)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self._trigger = None
        self._cut()

    def _cut(self) -> None:
        """Refuse new connections and cut the open ones."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections, self._open = self._open, set()
        if listener:
            listener.close()
        for connection in connections:
            _close(connection)

    def _listen(self, port: int) -> int:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            listener.close()
            raise
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener.getsockname()[1]

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the proxy went down
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            except OSError:  # the store itself did not answer: this client is cut, the proxy goes on
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                trigger = self._trigger
                if from_client and trigger and trigger[0].search(data):
                    self._trigger = None
                    self.down(trigger[1], data)  # the matching request never reaches the store
                    return
                sink.sendall(data)
        except OSError:
            pass
        _close(source)
        _close(sink)


def _close(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
