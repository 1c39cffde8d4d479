"""The GDB remote serial protocol over TCP: framing, the one client, and one dispatch over packets.

    server = GdbServer.listen(host, port, log)
    server.serve(target, stop)  -> Resume     (blocks until gdb resumes the guest)
    server.poll()               -> Event      (between slices while the guest runs)

A packet is `$data#cs` (cs: the data's byte sum mod 256, two hex digits);
the receiver acknowledges each with `+`, or asks for it again with `-`,
until both sides agree to drop acknowledgements (QStartNoAckMode).  A lone
0x03 byte between packets is gdb's Ctrl-C.  Replies are text (hex numbers,
`OK`, `Enn` with an errno), except qXfer data, which escapes `$ # } *`.

The server is single-threaded: the run loop calls `poll` between slices of
guest instructions (a new client, a Ctrl-C, a disconnect) and `serve`
when the guest stops; `serve` answers packets until a resume, detach or
kill.  One client at a time: a second one gets an error packet naming the
reason and is closed, the first goes on undisturbed.  A client that
disconnects counts as a detach.  Anything malformed gets `-` (bad framing)
or an `E` reply (bad arguments), never the end of the run.

What the guest is made of (registers, memory, breakpoints) is the
target's (runtime/debugger.py); this module only speaks the protocol.
"""
from __future__ import annotations

import select
import socket
from dataclasses import dataclass
from enum import Enum
from time import monotonic
from string import hexdigits as HEX_DIGITS
from typing import Callable, Protocol

from .errors import Refused

PACKET_SIZE = 0x4000                 # the largest packet we take (qSupported PacketSize)
INTERRUPT = 0x03
EIO, EFAULT, EINVAL = 5, 14, 22
SIGINT, SIGTRAP, SIGKILL, SIGSEGV, SIGALRM, SIGXCPU = 2, 5, 9, 11, 14, 24   # gdb's signal numbers
THREAD = "1"                         # the one vCPU, as gdb's one thread
CLOSING_GRACE = 2.0                  # seconds a refused client has to read its answer


class Resume(Enum):
    """Why `serve` returned: the guest goes on (continue, step), or the client is gone."""
    CONTINUE = "continue"
    STEP = "step"
    DETACH = "detach"                # `D`, or the client disconnected
    KILL = "kill"


class Event(Enum):
    """What `poll` saw while the guest ran."""
    ATTACHED = "a client connected"
    INTERRUPT = "Ctrl-C"
    DETACHED = "the client disconnected"


class Target(Protocol):
    """The machine side of a debugging session (runtime/debugger.py)."""
    def target_xml(self) -> str: ...
    def read_registers(self) -> bytes: ...
    def write_registers(self, data: bytes) -> None: ...
    def read_register(self, number: int) -> bytes: ...
    def write_register(self, number: int, data: bytes) -> None: ...
    def read_memory(self, address: int, size: int) -> bytes: ...
    def write_memory(self, address: int, data: bytes) -> None: ...
    def insert_breakpoint(self, address: int) -> None: ...
    def remove_breakpoint(self, address: int) -> None: ...
    def set_pc(self, address: int) -> None: ...


class Malformed(Exception):
    """A packet whose arguments do not parse."""


class Gone(Exception):
    """The client closed the connection (or it broke)."""


@dataclass
class StopReply:
    """A stop reply: `T` (stopped, with a signal), `W` (exited, with a status) or `X` (terminated)."""
    kind: str
    code: int
    swbreak: bool = False            # stopped at a software breakpoint (already rewound to it)
    registers: dict[int, bytes] | None = None   # expedited: gdb register number -> value

    def encode(self, swbreak_ok: bool) -> str:
        if self.kind != "T":
            return f"{self.kind}{self.code & 0xFF:02x}"
        parts = [f"T{self.code:02x}thread:{THREAD};"]
        parts += [f"{n:02x}:{v.hex()};" for n, v in (self.registers or {}).items()]
        if self.swbreak and swbreak_ok:
            parts.append("swbreak:;")
        return "".join(parts)


def checksum(data: bytes) -> bytes:
    return b"%02x" % (sum(data) & 0xFF)


def frame(data: bytes) -> bytes:
    return b"$" + data + b"#" + checksum(data)


def escape(data: bytes) -> bytes:
    """Binary data in a reply: `$ # } *` become `}` and the byte xor 0x20."""
    out = bytearray()
    for b in data:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


class Client:
    """One connection: a byte stream in, packets out, acknowledgements while they are on."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.acks = True
        self.last = b""              # the last packet sent, for a `-`
        self.swbreak = False         # gdb said it understands `swbreak` stop reasons
        self.interrupted = False     # a Ctrl-C byte arrived

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, payload: str | bytes) -> None:
        data = payload.encode("latin-1") if isinstance(payload, str) else payload
        self.last = frame(data)
        self._write(self.last)

    def _write(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise Gone() from None

    def receive(self, block: bool) -> bool:
        """Read what has arrived (waiting for something if `block`); Gone at end of stream."""
        if not block and not select.select([self.sock], [], [], 0)[0]:
            return False
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            raise Gone() from None
        if not data:
            raise Gone()
        self.buf += data
        return True

    def packet(self) -> str | None:
        """The next whole packet in the buffer, if any, acknowledged; bytes around packets are consumed."""
        buf = self.buf
        while buf:
            lead = buf[0]
            if lead == ord("$"):
                end = buf.find(b"#")
                if end < 0:
                    if len(buf) > 2 * PACKET_SIZE:          # no end in sight: drop it, ask again
                        del buf[:]
                        self._nack()
                    return None
                if len(buf) < end + 3:
                    return None
                data, sent = bytes(buf[1:end]), bytes(buf[end + 1:end + 3])
                del buf[:end + 3]
                if sent.lower() != checksum(data) or b"$" in data:
                    self._nack()
                    continue
                if self.acks:
                    self._write(b"+")
                return data.decode("latin-1")
            del buf[0]
            if lead == ord("-") and self.last:
                self._write(self.last)
            elif lead == INTERRUPT:
                self.interrupted = True
            # '+' and stray bytes: nothing to do
        return None

    def _nack(self) -> None:
        if self.acks:
            self._write(b"-")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class GdbServer:
    """The listening socket and the one client allowed at a time."""

    def __init__(self, listener: socket.socket, log: Callable[[str], None]):
        self.listener = listener
        self.log = log
        self.client: Client | None = None
        self.resumed = False                 # a resume packet waits for its stop reply
        self.last_stop = StopReply("T", SIGTRAP)
        self._closing: list[tuple[socket.socket, float]] = []   # refused clients reading their answer

    @classmethod
    def listen(cls, host: str, port: int, log: Callable[[str], None] = lambda text: None) -> GdbServer:
        """Bind and listen; OSError (address in use, bad host) for the caller to report."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(2)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return cls(sock, log)

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]

    # -- connections -----------------------------------------------------------------
    def wait_for_client(self) -> None:
        """Block until a client connects (--gdb-wait)."""
        while self.client is None:
            select.select([self.listener], [], [])
            self._accept()

    def poll(self) -> Event | None:
        """While the guest runs: a new client, a Ctrl-C or a disconnect; never blocks."""
        ready = select.select([self.listener] + ([self.client.sock] if self.client else []), [], [], 0)[0]
        self._reap()
        if self.listener in ready and self._accept():
            return Event.ATTACHED
        client = self.client
        if client is None or client.sock not in ready:
            return None
        try:
            client.receive(block=False)
            while client.packet() is not None:       # all-stop gdb sends nothing while running
                pass
        except Gone:
            self._drop()
            return Event.DETACHED
        if client.interrupted:
            client.interrupted = False
            return Event.INTERRUPT
        return None

    def _accept(self) -> bool:
        """Take a waiting connection: the client if there is none, else refuse it."""
        try:
            sock, peer = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.client is not None:
            self._refuse(sock, peer)
            return False
        self.client = Client(sock)
        self.resumed = False
        self.log(f"debugger connected from {_peer(peer)}")
        return True

    def _refuse(self, sock: socket.socket, peer) -> None:
        """Tell a second client why not, then let it read that before the socket closes."""
        self.log(f"refused a second debugger from {_peer(peer)}: one is already attached")
        try:
            sock.sendall(frame(b"E.one debugger at a time: another one is attached"))
        except OSError:
            sock.close()
            return
        self._close_gracefully(sock)

    def _close_gracefully(self, sock: socket.socket) -> None:
        """Close our end; the socket goes once the client closed its end (`_reap`)."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        except OSError:
            sock.close()
            return
        self._closing.append((sock, monotonic() + CLOSING_GRACE))

    def _reap(self) -> None:
        """Close refused clients once they have closed their end (or had their time)."""
        if not self._closing:
            return
        kept = []
        for sock, deadline in self._closing:
            try:
                while sock.recv(4096):
                    pass
                done = True                          # end of stream: they read the answer
            except BlockingIOError:
                done = monotonic() > deadline
            except OSError:
                done = True
            if done:
                sock.close()
            else:
                kept.append((sock, deadline))
        self._closing = kept

    def _drop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.resumed = False
            self.log("debugger disconnected; the guest runs on")

    def close(self) -> None:
        self._drop_quietly()
        for sock, _ in self._closing:
            sock.close()
        self._closing = []
        self.listener.close()

    def _drop_quietly(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    # -- stops -----------------------------------------------------------------------
    def report(self, stop: StopReply, message: str = "") -> None:
        """The guest stopped: remember why (for `?`), and answer the resume that is waiting, if any."""
        self.last_stop = stop
        client = self.client
        if client is None or not self.resumed:
            return
        self.resumed = False
        try:
            if message:
                client.send("O" + (message + "\n").encode().hex())
            client.send(stop.encode(client.swbreak))
        except Gone:
            self._drop()

    def finish(self, stop: StopReply, message: str = "") -> None:
        """The run is over: send the final reply if gdb waits for one, and close everything
        once the client has read it (its end closed, or CLOSING_GRACE)."""
        self.report(stop, message)
        if self.client is not None:
            self._close_gracefully(self.client.sock)
            self.client = None
        deadline = monotonic() + CLOSING_GRACE
        while self._closing and monotonic() < deadline:
            select.select([s for s, _ in self._closing], [], [], CLOSING_GRACE)
            self._reap()
        self.close()

    def serve(self, target: Target, stop: StopReply, message: str = "") -> Resume:
        """The guest is stopped: report it, then answer packets until gdb resumes, detaches or kills."""
        self.report(stop, message)
        while True:
            client = self.client
            if client is None:
                return Resume.DETACH
            try:
                packet = self._next_packet(client)
                resume = self._handle(client, target, packet)
            except Gone:
                self._drop()
                return Resume.DETACH
            if resume is not None:
                return resume

    def _next_packet(self, client: Client) -> str:
        while True:
            packet = client.packet()
            if packet is not None:
                return packet
            client.interrupted = False               # Ctrl-C while stopped: nothing to interrupt
            ready = select.select([client.sock, self.listener] + [s for s, _ in self._closing], [], [],
                                  CLOSING_GRACE if self._closing else None)[0]
            self._reap()
            if self.listener in ready:
                self._accept()
            if client.sock in ready:
                client.receive(block=True)

    # -- packets ---------------------------------------------------------------------
    def _handle(self, client: Client, target: Target, packet: str) -> Resume | None:
        """Answer one packet; a Resume when the guest should go on (or the session ends)."""
        try:
            reply, resume = self._dispatch(client, target, packet)
        except Malformed:
            reply, resume = f"E{EINVAL:02x}", None
        except Refused as e:
            reply, resume = f"E{e.errno & 0xFF:02x}", None
        if reply is not None:
            client.send(reply)
        if resume in (Resume.CONTINUE, Resume.STEP):
            self.resumed = True
        elif resume is not None:
            self._drop_quietly()
            self.log("debugger detached" if resume is Resume.DETACH else "the debugger killed the guest")
        return resume

    def _dispatch(self, client: Client, target: Target, packet: str) -> tuple[str | None, Resume | None]:
        """(reply or None for no reply, Resume or None): one case per packet gdb sends."""
        head, body = packet[:1], packet[1:]
        match head:
            case "?":
                return self.last_stop.encode(client.swbreak), None
            case "g":
                return target.read_registers().hex(), None
            case "G":
                target.write_registers(_hex_bytes(body))
                return "OK", None
            case "p":
                return target.read_register(_hex(body)).hex(), None
            case "P":
                number, value = _split(body, "=")
                target.write_register(_hex(number), _hex_bytes(value))
                return "OK", None
            case "m":
                address, size = _split(body, ",")
                return target.read_memory(_hex(address), min(_hex(size), PACKET_SIZE // 2)).hex(), None
            case "M":
                where, data = _split(body, ":")
                address, size = _split(where, ",")
                data = _hex_bytes(data)
                if len(data) != _hex(size):
                    raise Malformed()
                target.write_memory(_hex(address), data)
                return "OK", None
            case "Z" | "z":
                return self._breakpoint(target, head == "Z", body), None
            case "c" | "s" | "C" | "S":
                address = body if head in "cs" else body.partition(";")[2]    # a signal to pass: ignored
                if address:
                    target.set_pc(_hex(address))
                return None, Resume.CONTINUE if head in "cC" else Resume.STEP
            case "D":
                return "OK", Resume.DETACH
            case "k":
                return None, Resume.KILL
            case "H" | "T":
                return "OK", None
            case "q" | "Q":
                return self._query(client, target, packet), None
            case "v":
                if packet.startswith("vKill"):
                    return "OK", Resume.KILL
                return "", None                          # vCont, vFile, vMustReplyEmpty ...: not spoken
            case _:
                return "", None                          # unsupported: the empty reply says so

    def _breakpoint(self, target: Target, insert: bool, body: str) -> str:
        kind, address, _size = (body.split(",") + ["", ""])[:3]
        if kind != "0":
            return ""                                    # hardware breakpoints, watchpoints: not offered
        if insert:
            target.insert_breakpoint(_hex(address))
        else:
            target.remove_breakpoint(_hex(address))
        return "OK"

    def _query(self, client: Client, target: Target, packet: str) -> str | None:
        name = packet.split(":", 1)[0].split(",", 1)[0]
        match name:
            case "qSupported":
                client.swbreak = "swbreak+" in packet
                return f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;swbreak+;QStartNoAckMode+"
            case "QStartNoAckMode":
                client.send("OK")                        # acknowledged in the old mode, then none
                client.acks = False
                return None
            case "qXfer":
                return self._features(target, packet)
            case "qAttached":
                return "1"                               # quitting gdb detaches: the guest runs on
            case "qC":
                return f"QC{THREAD}"
            case "qfThreadInfo":
                return f"m{THREAD}"
            case "qsThreadInfo":
                return "l"
            case "qSymbol":
                return "OK"
            case _:
                return ""

    def _features(self, target: Target, packet: str) -> str:
        parts = packet.split(":")
        if len(parts) != 5 or parts[1:3] != ["features", "read"]:
            return ""
        if parts[3] != "target.xml":
            raise Refused(EINVAL, f"no feature document {parts[3]!r}")
        offset, length = (_hex(x) for x in _split(parts[4], ","))
        doc = target.target_xml().encode()
        chunk = doc[offset:offset + min(length, PACKET_SIZE // 2)]
        return ("l" if offset + len(chunk) >= len(doc) else "m") + escape(chunk).decode("latin-1")


def _split(text: str, sep: str) -> tuple[str, str]:
    if sep not in text:
        raise Malformed()
    a, b = text.split(sep, 1)
    return a, b


def _hex(text: str) -> int:
    if not text or text.strip(HEX_DIGITS):
        raise Malformed()
    return int(text, 16)


def _hex_bytes(text: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise Malformed() from None


def _peer(peer) -> str:
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
