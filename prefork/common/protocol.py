"""The prefork-interp wire protocol: pure encode/decode functions over bytes.

No I/O here (see ``fdio``); every function is testable without processes.  Imported by the
client on its hot path: only ``_struct`` and builtins.

Protocol v1 (chiark-utils' reference, spoken exactly)
------------------------------------------------------

Server -> client, as soon as the connection is accepted (the *greeting*)::

    b"PFI\\n"  xlen:u32 (HOST byte order!)  xdata:xlen bytes

The reference C client reads ``xlen`` without ``ntohl``, so it is written in host byte order
(little-endian on x86-64); every other length below is big-endian.

Client -> server (the *request*)::

    sigbyte:u8 = 0
    3 x sendmsg(data=b"\\0", SCM_RIGHTS=[fd])       fds 0, 1, 2 of the caller, in that order
    mlen:u32be  message:mlen bytes

``message`` is a sequence of NUL-terminated strings: every ``NAME=value`` of the environment,
an empty string, then ``interp``, ``script`` (when there is one) and the arguments.

Server -> client, when the call ends::

    status:u32be     a wait status as from waitpid(2)

Extension x1 (ours; used only when both sides say so)
-----------------------------------------------------

Offer: the greeting's xdata is a list of NUL-terminated tokens; a server that speaks x1
includes the token ``b"prefork-x1"``.  A v1 client ignores xdata, so v1 stays exact.

Acceptance: a client that saw the offer sends ``sigbyte = 0x01`` (a v1 server refuses any
non-zero byte, so the byte is never sent to one).  The request is then::

    sigbyte:u8 = 1
    1 x sendmsg(data=b"\\0", SCM_RIGHTS=[fd0, fd1, fd2, cwd])   cwd: an O_PATH/O_DIRECTORY fd
    mlen:u32be  message:mlen bytes                              as in v1
    xlen:u32be  ext:xlen bytes        ext = umask:u32be flags:u32be client_pid:u32be [+ future]

``flags``: bits 0..2 set = the caller's fd 0/1/2 was closed (the fd sent is /dev/null and the
executor closes it again); bit 3 = the client follows ``R`` records (below); unknown bits are
ignored.

Passed fds (x1 with the token ``b"prefork-fds"`` also offered): the caller's other open fds
(3 and up, those the client inherited), at their numbers.  Their numbers follow the 12
fixed bytes of ``ext``, and the fds themselves follow ``ext``, at most 253 (``SCM_MAX_FD``)
on each extra byte::

    ext = umask:u32be flags:u32be client_pid:u32be  npassed:u32be  fdnum:u32be x npassed
    ceil(npassed / 253) x sendmsg(data=b"\0", SCM_RIGHTS=[<= 253 fds])   in fdnum order

No ``npassed`` (or 0): no fds, no extra bytes (what a client sends that was not offered the
token).  Each ``fdnum`` is >= 3, they are distinct, at most ``MAX_PASSED_FDS`` of them.

After the request both directions carry 5-byte *records* ``tag:u8 value:u32be``:

- client -> server ``S sig``: deliver signal ``sig`` to the executor's process group.
- server -> client ``P pid``: the executor's pid (sent when the call is handed to it; with
  ``RETRY_TOKEN`` offered, just before, and again should that executor fail to take it).
- server -> client ``T sig``: the executor was stopped by ``sig``; the client stops itself.
- server -> client ``C 0``: the executor was continued.
- server -> client ``W status``: the final wait status; the server closes the connection.
- server -> client ``R code`` (only to a client that set flag bit 3, instead of running the
  call): a fork of this server cannot run the call as a direct run in the caller's context
  would (``prefork.server.context``); ``code`` is a 32-bit digest of that context.  The
  server closes the connection; the client sends the call again to the server of the ident
  ``ident.context_ident(base, IDENT, code)``, starting it if there is none.  A client told
  ``R`` by that server too runs the interpreter directly.

Unknown tags are ignored by both sides (room for further records).

Calls not started (x1 with the token ``b"prefork-retry"`` also offered): the server writes
``P`` to the client before it hands the call to that executor, so a connection that ends
before any ``P`` has arrived ran none of the script.  The client then sends the call again
(a few times, to the same server or a fresh one; then it runs the interpreter directly),
with the ``S`` records it had sent.  Without the token (an earlier server of ours sends
``P`` after the hand-over) such a connection is an error, as in v1.

Hand-over (server -> spare; internal, both ends are the same program)
---------------------------------------------------------------------

The server hands a complete call to its spare executor in one message on their socket pair,
the call's fds (3 for v1, 4 for x1) riding on its first byte by SCM_RIGHTS::

    magic:2s = b"PH"  nfds:u8  bits:u8  umask:u32be  flags:u32be  client_pid:u32be
    argv_len:u32be  env_len:u32be  npassed:u32be                    (the 28-byte head)
    argv:argv_len bytes    every argument NUL-terminated; at least one (the interpreter)
    env:env_len bytes      every ``NAME=value`` NUL-terminated (only with bit 2)
    fdnum:u32be x npassed  the numbers of the passed fds

``bits``: 1 = extended (x1) call; 2 = the environment is included (else the spare keeps the
one it set before the call: the previous call's, the same as this one's); 4 = ``umask`` is
set.  Other bits are refused.  EOF where the head would be: the server lets the spare go.

The head ends with ``npassed:u32be``, the number of passed fds (above); their numbers
(``npassed x u32be``) end the body, and the fds follow the body as in the request, at most
253 on each extra ``b"\0"`` byte.
"""

import _struct

MAGIC = b"PFI\n"
GREETING_HEAD = _struct.Struct("=4sI")  # host byte order, as the reference C client reads it
U32BE = _struct.Struct(">I")
RECORD = _struct.Struct(">cI")
EXT_FIXED = _struct.Struct(">III")

SIGBYTE_V1 = 0
SIGBYTE_X1 = 1
X1_TOKEN = b"prefork-x1"
#: Offered with ``X1_TOKEN``: the server takes the caller's other fds (see "Passed fds").
FDS_TOKEN = b"prefork-fds"
#: Offered with ``X1_TOKEN``: the server sends ``P`` before the executor has the call, so a
#: connection that ends before any ``P`` ran nothing of the script (see "Calls not started").
RETRY_TOKEN = b"prefork-retry"

V1_FDS = 3
X1_FDS = 4

FLAG_FD0_CLOSED = 1
FLAG_FD1_CLOSED = 2
FLAG_FD2_CLOSED = 4
FLAG_FOLLOWS_REDIRECT = 8

#: The kernel's limit on fds in one SCM_RIGHTS message (``SCM_MAX_FD``).
SCM_MAX_FD = 253
#: Upper bound on the passed fds of one call (the client refuses a call with more).
MAX_PASSED_FDS = 4096

REC_SIGNAL = b"S"
REC_PID = b"P"
REC_STOPPED = b"T"
REC_CONTINUED = b"C"
REC_STATUS = b"W"
REC_REDIRECT = b"R"

#: Upper bound on a request's message, so a client cannot make the server allocate gigabytes.
MAX_MESSAGE = 32 * 1024 * 1024
#: Upper bound on greeting extra data and on the extension block.
MAX_XDATA = 64 * 1024


HANDOVER_MAGIC = b"PH"
HANDOVER_HEAD = _struct.Struct(">2sBBIIIIII")
HANDOVER_EXTENDED = 1
HANDOVER_ENV = 2
HANDOVER_UMASK = 4
_HANDOVER_BITS = HANDOVER_EXTENDED | HANDOVER_ENV | HANDOVER_UMASK


class ProtocolError(Exception):
    """The peer sent something that is not the protocol; the text says what and where."""


# ---------------------------------------------------------------- greeting


def encode_greeting(tokens: tuple[bytes, ...] = ()) -> bytes:
    """The greeting, offering ``tokens`` (e.g. ``(X1_TOKEN,)``) in its extra data."""
    xdata = b"".join(t + b"\0" for t in tokens)
    return GREETING_HEAD.pack(MAGIC, len(xdata)) + xdata


def decode_greeting_head(head: bytes) -> int:
    """Check the 8-byte greeting head; return the length of the extra data that follows."""
    if len(head) != GREETING_HEAD.size:
        raise ProtocolError(f"greeting: truncated ({len(head)} of 8 bytes)")
    magic, xlen = GREETING_HEAD.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"greeting: bad magic {magic!r}")
    if xlen > MAX_XDATA:
        raise ProtocolError(f"greeting: extra data length {xlen} too large")
    return int(xlen)


def decode_offer(xdata: bytes) -> frozenset[bytes]:
    """The tokens offered in greeting extra data (anything unparseable offers nothing)."""
    if not xdata.endswith(b"\0"):
        return frozenset()
    return frozenset(t for t in xdata[:-1].split(b"\0") if t)


# ---------------------------------------------------------------- request message


def encode_message(env: list[bytes], argv: list[bytes]) -> bytes:
    """Length-prefixed message: ``NAME=value`` strings, an empty string, then argv."""
    parts = [e for e in env if b"=" in e and b"\0" not in e]
    for a in argv:
        if b"\0" in a:
            raise ProtocolError("argument contains a NUL byte")
    body = b"\0".join([*parts, b"", *argv]) + b"\0"
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return U32BE.pack(len(body)) + body


def decode_message(body: bytes) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """Split a message into ``[(name, value)]`` and argv; reject anything malformed."""
    if not body.endswith(b"\0"):
        raise ProtocolError("message: missing trailing NUL")
    strings = body[:-1].split(b"\0")
    try:
        sep = strings.index(b"")
    except ValueError:
        raise ProtocolError("message: no empty string ending the environment") from None
    env: list[tuple[bytes, bytes]] = []
    for entry in strings[:sep]:
        name, eq, value = entry.partition(b"=")
        if not eq:
            raise ProtocolError(f"message: environment entry without '=': {entry[:60]!r}")
        env.append((name, value))
    argv = strings[sep + 1 :]
    if not argv:
        raise ProtocolError("message: no interpreter in argv")
    return env, argv


def encode_ext(umask: int, flags: int, client_pid: int,
               passed: tuple[int, ...] | list[int] = ()) -> bytes:
    """The x1 extension block, length-prefixed; ``passed``: the numbers of the passed fds
    (only to a server that offered ``FDS_TOKEN``)."""
    block = EXT_FIXED.pack(umask, flags, client_pid)
    if passed:
        block += _encode_fdnums(passed)
    return U32BE.pack(len(block)) + block


def _encode_fdnums(passed: tuple[int, ...] | list[int]) -> bytes:
    return _struct.pack(f">I{len(passed)}I", len(passed), *passed)


def _decode_fdnums(block: bytes, offset: int, what: str) -> tuple[int, ...]:
    """``npassed`` and the fd numbers at ``offset``, checked (>= 3, distinct, not too many)."""
    if len(block) < offset + 4:
        return ()
    (n,) = U32BE.unpack_from(block, offset)
    if n > MAX_PASSED_FDS:
        raise ProtocolError(f"{what}: {n} passed fds, at most {MAX_PASSED_FDS}")
    if len(block) < offset + 4 + 4 * n:
        raise ProtocolError(f"{what}: {n} passed fd numbers announced, "
                            f"{(len(block) - offset - 4) // 4} there")
    nums = _struct.unpack_from(f">{n}I", block, offset + 4)
    if any(fd < 3 or fd > 0x7FFFFFFF for fd in nums) or len(set(nums)) != n:
        raise ProtocolError(f"{what}: bad passed fd numbers {list(nums)[:8]}")
    return tuple(int(fd) for fd in nums)


def decode_ext_passed(block: bytes) -> tuple[int, ...]:
    """The numbers of the passed fds in an extension block (none if it has no list)."""
    return _decode_fdnums(block, EXT_FIXED.size, "extension block")


def fd_chunks(count: int) -> int:
    """How many extra bytes carry ``count`` passed fds (``SCM_MAX_FD`` on each)."""
    return -(-count // SCM_MAX_FD)


def decode_ext(block: bytes) -> tuple[int, int, int]:
    """``(umask, flags, client_pid)`` from an extension block (extra bytes are ignored)."""
    if len(block) < EXT_FIXED.size:
        raise ProtocolError(f"extension block: {len(block)} bytes, need {EXT_FIXED.size}")
    umask, flags, pid = EXT_FIXED.unpack_from(block)
    if umask > 0o777:
        raise ProtocolError(f"extension block: bad umask {umask:#o}")
    return int(umask), int(flags), int(pid)


# ---------------------------------------------------------------- records and statuses


def encode_status(status: int) -> bytes:
    """A v1 final wait status."""
    return U32BE.pack(status & 0xFFFFFFFF)


def decode_status(data: bytes) -> int:
    """A v1 final wait status from exactly 4 bytes."""
    if len(data) != 4:
        raise ProtocolError(f"status: truncated ({len(data)} of 4 bytes)")
    return int(U32BE.unpack(data)[0])


def encode_record(tag: bytes, value: int) -> bytes:
    """One x1 record."""
    return RECORD.pack(tag, value & 0xFFFFFFFF)


def decode_records(buf: bytes) -> tuple[list[tuple[bytes, int]], bytes]:
    """Complete records at the front of ``buf``, and the incomplete rest."""
    n = len(buf) - len(buf) % RECORD.size
    recs = [(t, int(v)) for t, v in RECORD.iter_unpack(buf[:n])]
    return recs, buf[n:]


class Request:
    """A fully received call."""

    __slots__ = ("argv", "client_pid", "env", "extended", "fds", "flags", "passed", "umask")

    def __init__(self, extended: bool, fds: list[int], env: list[tuple[bytes, bytes]],
                 argv: list[bytes], umask: int | None = None, flags: int = 0,
                 client_pid: int = 0, passed: tuple[int, ...] = ()) -> None:
        self.extended = extended
        #: The fds received: 0, 1, 2 (and the cwd, x1), then one for each of ``passed``.
        self.fds = fds
        self.env = env
        self.argv = argv
        self.umask = umask
        self.flags = flags
        self.client_pid = client_pid
        #: The caller's numbers of the passed fds (``fds[X1_FDS:]``, in order).
        self.passed = passed


class RequestParser:
    """Incremental, I/O-free parser of a request as bytes and fds arrive.

    ``feed(data, fds)`` returns ``None`` until the request is complete, then the ``Request``;
    bytes after the request are kept in ``rest``.  Raises ``ProtocolError`` on anything wrong;
    the caller then closes ``self.fds`` (fds received so far, in order).

    Linear in the request's size: bytes are appended to one ``bytearray``, the header is
    parsed again only once enough has arrived to get further (``_wait``), and the message is
    decoded once, when complete.  With ``fds_offered`` (the ``prefork-fds`` token), the
    caller's other fds follow the extension block (``decode_ext_passed``).
    """

    def __init__(self, x1_offered: bool, fds_offered: bool = False) -> None:
        self.x1_offered = x1_offered
        self.fds_offered = x1_offered and fds_offered
        self.buf = bytearray()
        self.fds: list[int] = []
        self.rest = b""
        self.extended: bool | None = None
        self.done = False
        self._wait = 1  # bytes needed before parsing again can get further
        self._fd_limit: int | None = None  # fds allowed so far, once the passed ones are known
        self._message: tuple[list[tuple[bytes, bytes]], list[bytes]] | None = None

    def _need_fds(self) -> int:
        return X1_FDS if self.extended else V1_FDS

    def fds_ahead(self) -> int | None:
        """The most fds the next read can bring, or None while that is not known yet.

        A read ends with the first message carrying fds, so it brings one message's fds:
        the caller's std fds (one each under v1, all four in one under x1), then each chunk
        of passed fds.  None: passed fds may follow bytes still to read (the extension
        block counts them), so the reader must stop before any fds (``MSG_PEEK``).  The
        server makes room for this many before reading (a message whose fds do not fit
        loses them: the kernel drops what it cannot install)."""
        if self.extended is None:
            return X1_FDS if self.x1_offered else 1
        missing = self._need_fds() - len(self.fds)
        if missing > 0:
            return missing if self.extended else 1
        if not (self.extended and self.fds_offered):
            return 0
        if self._fd_limit is None:
            return None
        return min(SCM_MAX_FD, self._fd_limit - len(self.fds))

    def feed(self, data: bytes, fds: list[int] = []) -> Request | None:  # noqa: B006
        """Add received bytes and fds; return the request once complete."""
        if self.done:
            raise ProtocolError("data after the request was complete")
        self.fds.extend(fds)
        buf = self.buf
        buf += data
        if not buf:
            if self.fds:
                raise ProtocolError("fds received before the signalling byte")
            return None
        if self.extended is None:
            sig = buf[0]
            if sig == SIGBYTE_V1:
                self.extended = False
            elif sig == SIGBYTE_X1 and self.x1_offered:
                self.extended = True
            else:
                raise ProtocolError(f"signalling byte is {sig:#04x}, not zero")
        need = self._need_fds()
        if len(buf) >= self._wait:
            req = self._parse(buf, need)
            if req is not None:
                return req
        # Waiting for more bytes: no more fds than those already due may have come (the
        # passed ones ride on bytes after the extension block).
        limit = need if self._fd_limit is None else self._fd_limit
        if len(self.fds) > limit:
            raise ProtocolError(f"{len(self.fds)} fds received, expected {limit}")
        return None

    def _span(self, buf: bytearray, pos: int, limit: int, what: str, the: str) -> int | None:
        """The ``u32be`` length at ``pos`` once it and the bytes it counts have all arrived
        (else None, and ``_wait`` says how many bytes are needed); ``ProtocolError`` over
        ``limit``."""
        if len(buf) < pos + 4:
            self._wait = pos + 4
            return None
        size: int = U32BE.unpack_from(buf, pos)[0]
        if size > limit:
            raise ProtocolError(f"{what} {size} exceeds {the}{limit}")
        if len(buf) < pos + 4 + size:
            self._wait = pos + 4 + size
            return None
        return size

    def _parse(self, buf: bytearray, need: int) -> Request | None:
        fd_bytes = 1 if self.extended else V1_FDS
        pos = 1 + fd_bytes
        if len(buf) < pos:
            self._wait = pos
            return None
        if len(self.fds) < need:
            raise ProtocolError(f"only {len(self.fds)} fds received, expected {need}")
        if buf[1:pos] != b"\0" * fd_bytes:
            raise ProtocolError("fd-carrying bytes are not zero")
        mlen = self._span(buf, pos, MAX_MESSAGE, "message length", "the limit ")
        if mlen is None:
            return None
        pos += 4
        if self._message is None:  # decoded once, and rejected as soon as it is all here
            self._message = decode_message(bytes(buf[pos : pos + mlen]))
        env, argv = self._message
        pos += mlen
        umask: int | None = None
        flags = cpid = 0
        passed: tuple[int, ...] = ()
        if self.extended:
            xlen = self._span(buf, pos, MAX_XDATA, "extension block length", "")
            if xlen is None:
                return None
            pos += 4
            block = bytes(buf[pos : pos + xlen])
            umask, flags, cpid = decode_ext(block)
            pos += xlen
            if self.fds_offered:
                passed = decode_ext_passed(block)
                need += len(passed)
                self._fd_limit = need
                if len(self.fds) > need:
                    raise ProtocolError(f"{len(self.fds)} fds received, expected {need}")
                chunks = fd_chunks(len(passed))
                if len(buf) < pos + chunks:
                    self._wait = pos + chunks
                    return None
                if buf[pos : pos + chunks] != b"\0" * chunks:
                    raise ProtocolError("fd-carrying bytes are not zero")
                pos += chunks
        if len(self.fds) != need:
            raise ProtocolError(f"{len(self.fds)} fds received, expected {need}")
        self.done = True
        self.rest = bytes(buf[pos:])
        self.buf = bytearray()
        return Request(bool(self.extended), self.fds, env, argv, umask, flags, cpid, passed)


def encode_request_v1_tail(env: list[bytes], argv: list[bytes]) -> bytes:
    """What follows the fds in a v1 request."""
    return encode_message(env, argv)


def encode_request_x1_tail(env: list[bytes], argv: list[bytes], umask: int, flags: int,
                           client_pid: int,
                           passed: tuple[int, ...] | list[int] = ()) -> bytes:
    """What follows the fds in an x1 request (up to the bytes carrying the passed fds)."""
    return encode_message(env, argv) + encode_ext(umask, flags, client_pid, passed)


# ---------------------------------------------------------------- hand-over (server -> spare)


def encode_handover(req: Request, *, client_pid: int, with_env: bool) -> bytes:
    """The hand-over of ``req`` (its fds are sent alongside: only their number is here);
    ``client_pid``: the caller as the server knows it; ``with_env``: include ``req.env``."""
    argv = req.argv
    if not argv:
        raise ProtocolError("hand-over: no interpreter in argv")
    argv_blob = b"\0".join(argv) + b"\0"
    if argv_blob.count(b"\0") != len(argv):
        raise ProtocolError("hand-over: argument contains a NUL byte")
    bits = HANDOVER_EXTENDED if req.extended else 0
    env_blob = b""
    if with_env:
        bits |= HANDOVER_ENV
        env = req.env
        if env:
            for name, _value in env:
                if b"=" in name:
                    raise ProtocolError(f"hand-over: environment name with '=': {name[:60]!r}")
            env_blob = b"\0".join([name + b"=" + value for name, value in env]) + b"\0"
            if env_blob.count(b"\0") != len(env):
                raise ProtocolError("hand-over: environment entry contains a NUL byte")
    umask = 0
    if req.umask is not None:
        bits |= HANDOVER_UMASK
        umask = req.umask
    passed = req.passed
    nfds = len(req.fds) - len(passed)
    head = HANDOVER_HEAD.pack(HANDOVER_MAGIC, nfds, bits, umask, req.flags,
                              client_pid, len(argv_blob), len(env_blob), len(passed))
    return head + argv_blob + env_blob + (_encode_fdnums(passed)[4:] if passed else b"")


def decode_handover_head(head: bytes) -> int:
    """Check a hand-over's head; return the length of the body that follows it."""
    if len(head) != HANDOVER_HEAD.size:
        raise ProtocolError(f"hand-over: truncated head ({len(head)} of "
                            f"{HANDOVER_HEAD.size} bytes)")
    magic, nfds, bits, umask, _flags, _pid, argv_len, env_len, npassed = \
        HANDOVER_HEAD.unpack(head)
    if magic != HANDOVER_MAGIC:
        raise ProtocolError(f"hand-over: bad magic {magic!r}")
    if bits & ~_HANDOVER_BITS:
        raise ProtocolError(f"hand-over: unknown bits {bits:#04x}")
    want = X1_FDS if bits & HANDOVER_EXTENDED else V1_FDS
    if nfds != want:
        raise ProtocolError(f"hand-over: {nfds} fds announced, a call has {want}")
    if umask > 0o777:
        raise ProtocolError(f"hand-over: bad umask {umask:#o}")
    if not 0 < argv_len <= MAX_MESSAGE or env_len > MAX_MESSAGE:
        raise ProtocolError(f"hand-over: bad lengths (argv {argv_len}, env {env_len})")
    if env_len and not bits & HANDOVER_ENV:
        raise ProtocolError("hand-over: environment bytes without the environment bit")
    if npassed > MAX_PASSED_FDS or (npassed and not bits & HANDOVER_EXTENDED):
        raise ProtocolError(f"hand-over: {npassed} passed fds")
    return int(argv_len + env_len + 4 * npassed)


def handover_passed_count(head: bytes) -> int:
    """The number of passed fds a checked hand-over head announces (they follow its body)."""
    return int(HANDOVER_HEAD.unpack(head)[-1])


def decode_handover(head: bytes, body: bytes, fds: list[int]) -> tuple[Request, bool]:
    """The call handed over (``head`` as checked by ``decode_handover_head``, its ``body``,
    the ``fds`` that came with it), and whether it includes the environment (else
    ``Request.env`` is empty: the spare keeps its own)."""
    length = decode_handover_head(head)
    _magic, nfds, bits, umask, flags, pid, argv_len, env_len, npassed = \
        HANDOVER_HEAD.unpack(head)
    if len(body) != length:
        raise ProtocolError(f"hand-over: body of {len(body)} bytes, expected {length}")
    if len(fds) != nfds + npassed:
        raise ProtocolError(f"hand-over: expected {nfds + npassed} fds, got {len(fds)}")
    passed: tuple[int, ...] = ()
    if npassed:
        passed = _decode_fdnums(U32BE.pack(npassed) + body[argv_len + env_len:], 0,
                                "hand-over")
        body = body[:argv_len + env_len]
    argv_blob = body[:argv_len]
    if not argv_blob.endswith(b"\0"):
        raise ProtocolError("hand-over: argv without its trailing NUL")
    argv = argv_blob[:-1].split(b"\0")
    env: list[tuple[bytes, bytes]] = []
    env_blob = body[argv_len:]
    if env_blob:
        if not env_blob.endswith(b"\0"):
            raise ProtocolError("hand-over: environment without its trailing NUL")
        for entry in env_blob[:-1].split(b"\0"):
            name, eq, value = entry.partition(b"=")
            if not eq:
                raise ProtocolError(f"hand-over: environment entry without '=': "
                                    f"{entry[:60]!r}")
            env.append((name, value))
    extended = bool(bits & HANDOVER_EXTENDED)
    req = Request(extended, fds, env, argv, umask if bits & HANDOVER_UMASK else None,
                  int(flags), int(pid), passed)
    return req, bool(bits & HANDOVER_ENV)


def describe_status(status: int, *, short: bool = False) -> str:
    """A wait status in words: ``exit status 3`` / ``killed by signal 9`` (``short``:
    ``exit 3`` / ``signal 9``, as the server's call log has them)."""
    if status & 0x7F == 0:  # WIFEXITED
        return f"exit {status >> 8 & 0xFF}" if short else f"exit status {status >> 8 & 0xFF}"
    if (status & 0x7F) != 0x7F:  # WIFSIGNALED
        sig = status & 0x7F
        return f"signal {sig}" if short else f"killed by signal {sig}"
    return f"status {status:#x}" if short else f"wait status {status:#x}"
