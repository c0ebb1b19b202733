"""A minimal SPICE link client for refusal tests: it speaks the link
handshake byte by byte (protocols.md §6) so tests can send what real
clients never do (junk, truncated and oversized messages, foreign session
ids) and read the exact link error code Porthole answers with."""

import socket
import ssl
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

MAGIC = b"REDQ"
MAIN, DISPLAY, INPUTS = 1, 2, 3
# Common caps: AUTH_SELECTION | AUTH_SPICE | MINI_HEADER.
COMMON_CAPS = 0b1011

ERRORS = {0: "OK", 1: "ERROR", 2: "INVALID_MAGIC", 3: "INVALID_DATA", 4: "VERSION_MISMATCH",
          5: "NEED_SECURED", 6: "NEED_UNSECURED", 7: "PERMISSION_DENIED", 8: "BAD_CONNECTION_ID",
          9: "CHANNEL_NOT_AVAILABLE"}


def link_mess(channel_type, channel_id=0, connection_id=0, common=COMMON_CAPS, channel_caps=0):
    body = struct.pack("<IBBIII", connection_id, channel_type, channel_id, 1, 1, 18)
    body += struct.pack("<II", common, channel_caps)
    return MAGIC + struct.pack("<III", 2, 2, len(body)) + body


class Channel:
    """One channel connection (TLS when ca is given)."""

    def __init__(self, port, ca=None, host="127.0.0.1", timeout=10, source=None):
        """source: the local address to connect from (a client behind a balancer)."""
        raw = socket.create_connection((host, port), timeout=timeout,
                                       source_address=None if source is None else (source, 0))
        if ca is not None:
            ctx = ssl.create_default_context(cafile=str(ca))
            raw = ctx.wrap_socket(raw, server_hostname=host)
        self.sock = raw

    def close(self):
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def reply(self):
        """The link reply: (error name, public key DER)."""
        header = self.recv_exact(16)
        assert header[:4] == MAGIC, header
        size = struct.unpack("<I", header[12:16])[0]
        assert size <= 4096, size
        body = self.recv_exact(size)
        error = struct.unpack("<I", body[:4])[0]
        return ERRORS.get(error, error), body[4:166]

    def link(self, channel_type, connection_id=0, channel_id=0):
        self.send(link_mess(channel_type, channel_id, connection_id))
        return self.reply()

    def auth(self, public_key_der, ticket):
        """Sends mechanism + encrypted ticket; returns the link result's name."""
        self.send_ticket(public_key_der, ticket)
        return self.result()

    def send_ticket(self, public_key_der, ticket):
        """Sends mechanism + encrypted ticket, without waiting for the result."""
        key = serialization.load_der_public_key(public_key_der)
        ct = key.encrypt(ticket.encode() + b"\0", padding.OAEP(mgf=padding.MGF1(hashes.SHA1()),
                                                                algorithm=hashes.SHA1(), label=None))
        self.send(struct.pack("<I", 1) + ct)

    def result(self):
        code = struct.unpack("<I", self.recv_exact(4))[0]
        return ERRORS.get(code, code)

    def open(self, channel_type, ticket, connection_id=0):
        """Link + auth; returns the link result's name."""
        error, key = self.link(channel_type, connection_id)
        if error != "OK":
            return error
        return self.auth(key, ticket)

    def session_id(self):
        """Reads main channel messages (mini headers) up to INIT; its session id."""
        while True:
            kind, size = struct.unpack("<HI", self.recv_exact(6))
            body = self.recv_exact(size)
            if kind == 103:
                return struct.unpack("<I", body[:4])[0]

    def closed(self, timeout=10):
        """Whether the peer closes (EOF) within timeout, reading and dropping data."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
            return True
        except (socket.timeout, TimeoutError):
            return False
        except OSError:
            return True


class WsChannel(Channel):
    """A SPICE channel over one of Porthole's WebSockets, as spice-html5 opens
    it: /spice?token= (Porthole's page), or /websockify with the token in a
    cookie and none in the URL (Debian's spice_auto.html)."""

    def __init__(self, p, token, path=None, cookie=None, origin=None):
        from websockets.sync.client import connect
        headers = {"Cookie": f"token={cookie}"} if cookie else None
        self.ws = connect(f"ws://127.0.0.1:{p.public_port}/{path or f'spice?token={token}'}", open_timeout=10,
                          close_timeout=2, additional_headers=headers, origin=origin or p.base)
        self.buf = b""

    def send(self, data):
        self.ws.send(data)

    def recv_exact(self, n):
        while len(self.buf) < n:
            self.buf += self.ws.recv(timeout=10)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def close(self):
        self.ws.close()

    def closed(self, timeout=10):
        """Whether Porthole closes the socket within timeout, reading and dropping data."""
        from websockets.exceptions import ConnectionClosed
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                return False
            except ConnectionClosed:
                return True
        return False
