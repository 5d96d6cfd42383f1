"""A TCP proxy on 127.0.0.1 in front of a test server that can be told to fail: real outages for storage tests.

Modes: "pass" forwards both ways; "kill" resets every open connection and each new one at once; "stall" accepts
connections and reads them but never answers nor forwards (a black hole); "refuse" stops listening, so connects get
"connection refused". set_mode switches at any time, also while requests are in flight. deny(prefix) answers HTTP
requests whose request line starts with prefix (b"PUT /bucket/key ") as the store does when a policy refuses them
(403 AccessDenied), without forwarding them. `stalled` counts the connections on which "stall" swallowed something,
each a client waiting for an answer: a test waits for it instead of sleeping.
"""

from __future__ import annotations

import select
import socket
import struct
import threading


class FaultProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port; endpoint is its http:// address."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = "pass"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._closed = False
        self._listener: socket.socket | None = None
        self.denied: bytes | None = None
        self.denials = 0  # requests answered by deny
        self.stalled = 0  # connections with a request or an answer swallowed by "stall"
        self.port = self._listen(0)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()
        return int(s.getsockname()[1])

    def set_mode(self, mode: str) -> None:
        assert mode in ("pass", "kill", "stall", "refuse"), mode
        with self._lock:
            old, self.mode = self.mode, mode
            if mode in ("kill", "refuse"):
                for c in self._conns:
                    _reset(c)
                self._conns.clear()
            listener = self._listener
        if mode == "refuse" and listener is not None:
            self._listener = None
            listener.close()
        elif old == "refuse" and mode != "refuse":
            self._listen(self.port)

    def deny(self, prefix: bytes | None) -> None:
        """Refuse requests starting with prefix with a 403 from now on (None: forward everything again)."""
        self.denied = prefix

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: "refuse" or stop()
                return
            with self._lock:
                mode = self.mode
                if mode == "kill" or self._closed:
                    _reset(client)
                    continue
                self._conns.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        stalled = False
        try:
            while True:
                r, _, _ = select.select([client] + ([upstream] if upstream else []), [], [], 0.2)
                mode = self.mode
                if mode in ("kill", "refuse") or self._closed:
                    return
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    if mode == "stall":
                        if not stalled:
                            stalled = True
                            with self._lock:
                                self.stalled += 1
                        continue  # swallowed: the client waits for an answer that never comes
                    if s is client and self.denied is not None and data.startswith(self.denied):
                        self.denials += 1
                        client.sendall(_DENIED)
                        _drain(client)
                        return
                    if s is client:
                        if upstream is None:
                            upstream = socket.create_connection(("127.0.0.1", self.target_port))
                            with self._lock:
                                self._conns.append(upstream)
                        upstream.sendall(data)
                    else:
                        client.sendall(data)
        except (OSError, ValueError):  # ValueError: select on a socket another thread closed
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    _reset(s)
                    with self._lock:
                        if s in self._conns:
                            self._conns.remove(s)

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            for c in self._conns:
                _reset(c)
            self._conns.clear()
        if self._listener is not None:
            self._listener.close()


_BODY = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
_DENIED = (
    b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/xml\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


def _drain(s: socket.socket) -> None:
    """After an answer: say we are done and read what the client still sends (a request body), so that closing
    does not reset the connection before the client has read the answer."""
    try:
        s.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        while s.recv(65536):
            pass
    except OSError:
        pass


def _reset(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer or a dropped route does, not a polite FIN."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    except OSError:
        pass
