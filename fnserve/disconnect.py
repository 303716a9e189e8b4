"""Is the client of a running invocation still there? (SPEC §4: a client that
disconnects has its function killed.)

The request has been read; its socket is watched with poll(), which reads nothing
and works on a TLS socket too. Only a connection that is really gone counts:
- a reset (POLLHUP, POLLERR): gone;
- the read side closed (POLLRDHUP) is not enough: a client may send its request and
  then shutdown(SHUT_WR), legal in HTTP/1.1, and still wait for the answer. Only a
  write tells the two apart, so the first time it is seen on an HTTP/1.1 request the
  interim response `100 Continue` is written. Every HTTP/1.1 client must accept a 1xx
  it did not ask for (RFC 9110 §15.2), so a half-closed client just skips it; a closed
  one answers with a reset, which the next look sees as POLLHUP/POLLERR, or the write
  itself fails.
- HTTP/1.0 has no interim responses, so nothing may be written: there only a reset
  counts, and a client that closed cleanly is noticed when its answer is written.
"""

from __future__ import annotations

import select
import socket
import ssl

INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
_RESET = select.POLLHUP | select.POLLERR | select.POLLNVAL


class ClientWatch:
    """Looks at one request's connection; `gone()` is cheap enough to call every poll."""

    def __init__(self, sock: socket.socket, protocol: str) -> None:
        self.sock = sock
        self.may_write_interim = protocol == "HTTP/1.1"
        self.probed = False

    def gone(self) -> bool:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        mask = 0
        for _fd, events in poller.poll(0):
            mask |= events
        return self.hangup(mask)

    def hangup(self, mask: int) -> bool:
        """Given the poll events seen on the socket, is the client gone? A caller that
        polls the socket itself (an inline run) asks this, and after a False waits for
        a reset only (events 0): the read side stays closed, and POLLRDHUP with it."""
        if mask & _RESET:
            return True
        if not mask & select.POLLRDHUP or not self.may_write_interim or self.probed:
            return False
        self.probed = True  # once: a closed peer resets on it, a half-closed one reads it
        return not self._write_interim()

    def _write_interim(self) -> bool:
        """False when the write fails: the client is gone."""
        try:
            if isinstance(self.sock, ssl.SSLSocket):  # encrypted, as a TLS record
                self.sock.sendall(INTERIM)
            else:  # never block this thread on a client that does not read
                self.sock.send(INTERIM, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:  # earlier answers unread (pipelining): cannot tell yet
            return True
        except (OSError, ValueError):  # EPIPE, ECONNRESET; a closed socket
            return False
        return True
