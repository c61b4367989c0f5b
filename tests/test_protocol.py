"""Pure codec tests (no processes): ``prefork.common.protocol`` (the wire protocol and the
server -> spare hand-over) and ``prefork.common.envspec``.

Every encoder is checked against hand-written wire bytes (so a symmetric mistake in encode and
decode cannot hide), every decoder against every malformed input it must reject, and the
incremental request parser gives the same ``Request`` whether bytes arrive in one chunk or one
at a time.  The fds given to the parser are plain integers: it never touches them.
"""

from __future__ import annotations

import itertools
import struct
import sys

import pytest

from prefork.common import envspec, protocol
from prefork.common.envspec import EnvSpecError
from prefork.common.protocol import ProtocolError, Request, RequestParser

pytestmark = pytest.mark.timeout(30)

ENV = [b"PATH=/usr/bin:/bin", b"EMPTY=", b"SPACES=a b  c", b"RAW=\xff\xfe\x80", b"EQ=x=y"]
ARGV = [b"/usr/bin/python3", b"/tmp/s cript.py", b"", b"with space", b"\xff\xfe non-utf8", b""]


def _body(env: list[bytes], argv: list[bytes]) -> bytes:
    """The message body as PROTOCOL.md words it, built independently of the encoder."""
    out = b""
    for e in env:
        out += e + b"\0"
    out += b"\0"
    for a in argv:
        out += a + b"\0"
    return out


def _v1_request(env: list[bytes], argv: list[bytes]) -> bytes:
    body = _body(env, argv)
    return b"\0" + b"\0\0\0" + len(body).to_bytes(4, "big") + body


def _x1_request(env: list[bytes], argv: list[bytes], umask: int = 0o027, flags: int = 0,
                pid: int = 4242, ext_extra: bytes = b"") -> bytes:
    body = _body(env, argv)
    ext = struct.pack(">III", umask, flags, pid) + ext_extra
    return (b"\x01" + b"\0" + len(body).to_bytes(4, "big") + body
            + len(ext).to_bytes(4, "big") + ext)


# ---------------------------------------------------------------- greeting


def test_greeting_without_offer_is_the_reference_greeting() -> None:
    assert protocol.encode_greeting() == b"PFI\n\0\0\0\0"
    assert protocol.decode_greeting_head(b"PFI\n\0\0\0\0") == 0


def test_greeting_length_is_in_host_byte_order() -> None:
    """The reference C client reads this one length without ntohl (PROTOCOL.md)."""
    g = protocol.encode_greeting((protocol.X1_TOKEN,))
    xdata = b"prefork-x1\0"
    assert g == b"PFI\n" + len(xdata).to_bytes(4, sys.byteorder) + xdata
    assert protocol.decode_greeting_head(g[:8]) == len(xdata)
    assert protocol.decode_offer(g[8:]) == frozenset({protocol.X1_TOKEN})


@pytest.mark.skipif(sys.byteorder != "little", reason="the example is a little-endian one")
def test_big_endian_greeting_length_is_refused_not_allocated() -> None:
    """``\\0\\0\\0\\4`` read in host order is 64 MiB: the C client would wait for that many
    bytes; we refuse it as too large instead of waiting or allocating."""
    with pytest.raises(ProtocolError, match="too large"):
        protocol.decode_greeting_head(b"PFI\n\0\0\0\x04")


@pytest.mark.parametrize(("head", "match"), [
    (b"", "truncated"),
    (b"PFI\n\0\0\0", "truncated"),
    (b"PFI\n\0\0\0\0\0", "truncated"),
    (b"PFX\n\0\0\0\0", "bad magic"),
    (b"pfi\n\0\0\0\0", "bad magic"),
    (b"PFI\n" + (protocol.MAX_XDATA + 1).to_bytes(4, sys.byteorder), "too large"),
    (b"PFI\n\xff\xff\xff\xff", "too large"),
])
def test_greeting_head_malformed(head: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_greeting_head(head)


def test_greeting_head_at_the_limit_is_accepted() -> None:
    head = b"PFI\n" + protocol.MAX_XDATA.to_bytes(4, sys.byteorder)
    assert protocol.decode_greeting_head(head) == protocol.MAX_XDATA


@pytest.mark.parametrize(("xdata", "offered"), [
    (b"", frozenset()),
    (b"prefork-x1\0", frozenset({b"prefork-x1"})),
    (b"other\0prefork-x1\0", frozenset({b"other", b"prefork-x1"})),
    (b"other\0\0prefork-x1\0", frozenset({b"other", b"prefork-x1"})),
    (b"prefork-x1", frozenset()),          # no terminating NUL: offers nothing
    (b"prefork-x1\0junk", frozenset()),
    (b"\0", frozenset()),
    (b"prefork-x10\0", frozenset({b"prefork-x10"})),
])
def test_offer_tokens(xdata: bytes, offered: frozenset[bytes]) -> None:
    assert protocol.decode_offer(xdata) == offered
    assert (protocol.X1_TOKEN in protocol.decode_offer(xdata)) == \
        (protocol.X1_TOKEN in offered)


def test_offer_round_trip_of_several_tokens() -> None:
    tokens = (b"a", protocol.X1_TOKEN, b"z-9")
    g = protocol.encode_greeting(tokens)
    xlen = protocol.decode_greeting_head(g[:8])
    assert len(g) == 8 + xlen
    assert protocol.decode_offer(g[8:]) == frozenset(tokens)


# ---------------------------------------------------------------- message


def test_message_encoding_matches_the_wire_format() -> None:
    enc = protocol.encode_message(ENV, ARGV)
    body = _body(ENV, ARGV)
    assert enc == len(body).to_bytes(4, "big") + body


def test_message_round_trip_bytes_spaces_empty_args() -> None:
    enc = protocol.encode_message(ENV, ARGV)
    env, argv = protocol.decode_message(enc[4:])
    assert env == [tuple(e.split(b"=", 1)) for e in ENV]
    assert argv == ARGV


def test_message_with_empty_environment_and_lone_interpreter() -> None:
    enc = protocol.encode_message([], [b"perl"])
    assert enc[4:] == b"\0perl\0"
    assert protocol.decode_message(enc[4:]) == ([], [b"perl"])


def test_message_encoder_drops_env_entries_without_equals_or_with_nul() -> None:
    enc = protocol.encode_message([b"GOOD=1", b"NOEQUALS", b"NUL=a\0b"], [b"i"])
    assert protocol.decode_message(enc[4:]) == ([(b"GOOD", b"1")], [b"i"])


def test_message_encoder_refuses_nul_in_argument() -> None:
    with pytest.raises(ProtocolError, match="NUL"):
        protocol.encode_message([], [b"interp", b"a\0b"])


def test_message_encoder_refuses_oversized_message() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        protocol.encode_message([], [b"i", b"x" * protocol.MAX_MESSAGE])


@pytest.mark.parametrize(("body", "match"), [
    (b"", "trailing NUL"),
    (b"A=1\0\0interp", "trailing NUL"),
    (b"A=1\0B=2\0", "no empty string"),
    (b"A=1\0", "no empty string"),
    (b"A=1\0NOEQ\0\0interp\0", "without '='"),
    (b"NOEQ\0\0interp\0", "without '='"),
    (b"A=1\0\0", "no interpreter"),
    (b"\0", "no interpreter"),
])
def test_message_malformed(body: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_message(body)


# ---------------------------------------------------------------- ext block, status, records


def test_ext_block_round_trip_and_extra_bytes_ignored() -> None:
    enc = protocol.encode_ext(0o027, 5, 123456)
    assert enc == b"\0\0\0\x0c" + struct.pack(">III", 0o027, 5, 123456)
    assert protocol.decode_ext(enc[4:]) == (0o027, 5, 123456)
    assert protocol.decode_ext(enc[4:] + b"future") == (0o027, 5, 123456)


@pytest.mark.parametrize(("block", "match"), [
    (b"", "need 12"),
    (struct.pack(">II", 0o022, 0), "need 12"),
    (struct.pack(">III", 0o1000, 0, 1), "bad umask"),
    (struct.pack(">III", 0xFFFFFFFF, 0, 1), "bad umask"),
])
def test_ext_block_malformed(block: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_ext(block)


@pytest.mark.parametrize("status", [0, 1 << 8, 42 << 8, 255 << 8, 2, 9 | 0x80, 0x137f])
def test_status_round_trip(status: int) -> None:
    enc = protocol.encode_status(status)
    assert enc == status.to_bytes(4, "big")
    assert protocol.decode_status(enc) == status


@pytest.mark.parametrize("data", [b"", b"\0\0\0", b"\0\0\0\0\0"])
def test_status_must_be_four_bytes(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="status"):
        protocol.decode_status(data)


def test_records_round_trip_and_partial_records() -> None:
    recs = [(protocol.REC_PID, 31337), (protocol.REC_STOPPED, 20), (protocol.REC_CONTINUED, 0),
            (b"?", 7), (protocol.REC_STATUS, 42 << 8)]
    wire = b"".join(protocol.encode_record(t, v) for t, v in recs)
    assert protocol.encode_record(protocol.REC_PID, 1) == b"P\0\0\0\x01"
    assert len(wire) == 5 * len(recs)
    assert protocol.decode_records(wire) == (recs, b"")
    # Arriving in pieces of every size, the records come out complete and in order.
    for size in range(1, 12):
        got: list[tuple[bytes, int]] = []
        pending = b""
        for i in range(0, len(wire), size):
            done, pending = protocol.decode_records(pending + wire[i:i + size])
            got.extend(done)
        assert (got, pending) == (recs, b"")
    assert protocol.decode_records(wire[:7]) == (recs[:1], wire[5:7])
    assert protocol.decode_records(b"W\0\0") == ([], b"W\0\0")


def test_record_value_is_32_bit() -> None:
    assert protocol.encode_record(protocol.REC_SIGNAL, -1) == b"S\xff\xff\xff\xff"


def test_request_tails() -> None:
    assert protocol.encode_request_v1_tail(ENV, ARGV) == protocol.encode_message(ENV, ARGV)
    assert protocol.encode_request_x1_tail(ENV, ARGV, 0o22, 1, 9) == \
        protocol.encode_message(ENV, ARGV) + protocol.encode_ext(0o22, 1, 9)


# ---------------------------------------------------------------- request parser


def _feed_all(parser: RequestParser, wire: bytes, fds_at: dict[int, list[int]],
              chunk: int | None) -> Request | None:
    """Feed ``wire`` (``fds_at[i]`` arrive with byte i) in chunks of ``chunk`` bytes (None:
    one chunk per fd-carrying byte boundary, i.e. as few recvmsg calls as possible)."""
    if chunk is None:
        cuts = sorted({0, *fds_at, len(wire)})
        pieces = list(itertools.pairwise(cuts))
    else:
        pieces = [(i, min(i + chunk, len(wire))) for i in range(0, len(wire), chunk)]
    result = None
    for a, b in pieces:
        fds = [fd for i in range(a, b) for fd in fds_at.get(i, [])]
        got = parser.feed(wire[a:b], fds)
        if got is not None:
            assert result is None
            result = got
            assert b == len(wire), "request complete before all its bytes arrived"
    return result


def _same(a: Request, b: Request) -> None:
    for name in Request.__slots__:
        assert getattr(a, name) == getattr(b, name), name


V1_FDS_AT = {1: [10], 2: [11], 3: [12]}
X1_FDS_AT = {1: [10, 11, 12, 13]}


@pytest.mark.parametrize("x1_offered", [False, True])
def test_v1_request_whole_and_byte_by_byte(x1_offered: bool) -> None:
    wire = _v1_request(ENV, ARGV)
    whole = _feed_all(RequestParser(x1_offered), wire, V1_FDS_AT, None)
    assert whole is not None
    assert not whole.extended
    assert whole.fds == [10, 11, 12]
    assert whole.env == [tuple(e.split(b"=", 1)) for e in ENV]
    assert whole.argv == ARGV
    assert whole.umask is None and whole.flags == 0 and whole.client_pid == 0
    bytewise = _feed_all(RequestParser(x1_offered), wire, V1_FDS_AT, 1)
    assert bytewise is not None
    _same(whole, bytewise)
    for chunk in (2, 3, 5, 7, 64):
        r = _feed_all(RequestParser(x1_offered), wire, V1_FDS_AT, chunk)
        assert r is not None
        _same(whole, r)


def test_x1_request_whole_and_byte_by_byte() -> None:
    wire = _x1_request(ENV, ARGV, umask=0o077, flags=protocol.FLAG_FD1_CLOSED, pid=777,
                       ext_extra=b"later")
    whole = _feed_all(RequestParser(True), wire, X1_FDS_AT, None)
    assert whole is not None
    assert whole.extended
    assert whole.fds == [10, 11, 12, 13]
    assert whole.argv == ARGV
    assert (whole.umask, whole.flags, whole.client_pid) == (0o077, 2, 777)
    for chunk in (1, 2, 3, 5, 11):
        r = _feed_all(RequestParser(True), wire, X1_FDS_AT, chunk)
        assert r is not None
        _same(whole, r)


def test_encoders_produce_what_the_parser_accepts() -> None:
    wire = b"\0" + b"\0\0\0" + protocol.encode_request_v1_tail(ENV, ARGV)
    assert wire == _v1_request(ENV, ARGV)
    wire = b"\x01\0" + protocol.encode_request_x1_tail(ENV, ARGV, 0o027, 0, 4242)
    assert wire == _x1_request(ENV, ARGV)
    r = _feed_all(RequestParser(True), wire, X1_FDS_AT, None)
    assert r is not None and r.umask == 0o027 and r.client_pid == 4242


def test_bytes_after_the_request_are_kept() -> None:
    """x1 records the client sends right after the request (a forwarded signal) survive."""
    rec = protocol.encode_record(protocol.REC_SIGNAL, 15)
    parser = RequestParser(True)
    wire = _x1_request(ENV, ARGV)
    assert parser.feed(wire[:1]) is None
    r = parser.feed(wire[1:] + rec, [10, 11, 12, 13])
    assert r is not None
    assert parser.rest == rec
    with pytest.raises(ProtocolError, match="after the request"):
        parser.feed(b"x")


def test_empty_feed_before_anything_is_harmless() -> None:
    parser = RequestParser(False)
    assert parser.feed(b"") is None
    assert _feed_all(parser, _v1_request([], [b"i"]), V1_FDS_AT, None) is not None


def _reject(parser: RequestParser, steps: list[tuple[bytes, list[int]]], match: str) -> None:
    """Feeding ``steps`` must raise ProtocolError matching ``match`` at the last step at the
    latest (and not before the data that makes it wrong has arrived)."""
    with pytest.raises(ProtocolError, match=match):
        for data, fds in steps:
            parser.feed(data, fds)


@pytest.mark.parametrize("sig", [0x01, 0x02, 0x7F, 0xFF])
def test_nonzero_signalling_byte_rejected_when_x1_not_offered(sig: int) -> None:
    _reject(RequestParser(False), [(bytes([sig]), [])], f"signalling byte is {sig:#04x}")


@pytest.mark.parametrize("sig", [0x02, 0xFF])
def test_unknown_signalling_byte_rejected_even_with_x1_offered(sig: int) -> None:
    _reject(RequestParser(True), [(bytes([sig]), [])], "signalling byte")


def test_fds_before_the_signalling_byte() -> None:
    _reject(RequestParser(False), [(b"", [10])], "before the signalling byte")


@pytest.mark.parametrize(("x1", "steps", "match"), [
    # v1: three fds expected, one per byte
    (False, [(b"\0\0", [10, 11]), (b"\0\0", [12, 13])], "4 fds received, expected 3"),
    (False, [(b"\0\0\0\0", [10, 11])], "only 2 fds received, expected 3"),
    (False, [(b"\0\0\0\0\0\0\0\0", [])], "only 0 fds"),
    # x1: four fds expected with one byte
    (True, [(b"\x01\0", [10, 11, 12, 13, 14])], "5 fds received, expected 4"),
    (True, [(b"\x01\0", [10, 11, 12])], "only 3 fds received, expected 4"),
])
def test_wrong_number_of_fds(x1: bool, steps: list[tuple[bytes, list[int]]],
                             match: str) -> None:
    parser = RequestParser(x1)
    _reject(parser, steps, match)
    assert parser.fds == [fd for _, fds in steps for fd in fds]  # the caller closes these


@pytest.mark.parametrize(("x1", "wire", "fds"), [
    (False, b"\0\0\x01\0" + b"\0\0\0\0", [10, 11, 12]),
    (False, b"\0\xff\0\0" + b"\0\0\0\0", [10, 11, 12]),
    (True, b"\x01\x07" + b"\0\0\0\0", [10, 11, 12, 13]),
])
def test_fd_carrying_bytes_must_be_zero(x1: bool, wire: bytes, fds: list[int]) -> None:
    _reject(RequestParser(x1), [(wire, fds)], "fd-carrying bytes are not zero")


@pytest.mark.parametrize("mlen", [protocol.MAX_MESSAGE + 1, 0xFFFFFFFF])
def test_absurd_message_length_rejected_at_the_header(mlen: int) -> None:
    """Refused as soon as the 4 length bytes are in, before any of the body arrives."""
    parser = RequestParser(False)
    assert parser.feed(b"\0\0\0\0", [10, 11, 12]) is None
    _reject(parser, [(mlen.to_bytes(4, "big"), [])], "exceeds the limit")


def test_message_at_the_length_limit_is_waited_for() -> None:
    parser = RequestParser(False)
    assert parser.feed(b"\0\0\0\0" + protocol.MAX_MESSAGE.to_bytes(4, "big"),
                       [10, 11, 12]) is None


@pytest.mark.parametrize("xlen", [protocol.MAX_XDATA + 1, 0xFFFFFFFF])
def test_absurd_ext_length_rejected_at_the_header(xlen: int) -> None:
    body = _body([], [b"i"])
    wire = b"\x01\0" + len(body).to_bytes(4, "big") + body
    parser = RequestParser(True)
    assert parser.feed(wire, [10, 11, 12, 13]) is None
    _reject(parser, [(xlen.to_bytes(4, "big"), [])], "extension block length")


@pytest.mark.parametrize(("ext", "match"), [
    (b"", "need 12"),
    (b"\0\0\0\x12\0\0\0\0", "need 12"),
    (struct.pack(">III", 0o4000, 0, 1), "bad umask"),
])
def test_bad_ext_block_in_request(ext: bytes, match: str) -> None:
    body = _body([], [b"i"])
    wire = (b"\x01\0" + len(body).to_bytes(4, "big") + body + len(ext).to_bytes(4, "big")
            + ext)
    _reject(RequestParser(True), [(wire, [10, 11, 12, 13])], match)


@pytest.mark.parametrize(("body", "match"), [
    (b"A=1\0\0i", "trailing NUL"),
    (b"A=1\0", "no empty string"),
    (b"NOEQ\0\0i\0", "without '='"),
    (b"A=1\0\0", "no interpreter"),
])
def test_malformed_message_in_request(body: bytes, match: str) -> None:
    wire = b"\0\0\0\0" + len(body).to_bytes(4, "big") + body
    _reject(RequestParser(False), [(wire, [10, 11, 12])], match)


def test_truncated_request_is_never_complete() -> None:
    """Every proper prefix of a request leaves the parser waiting (the server then sees EOF
    or its deadline)."""
    wire = _x1_request(ENV, ARGV)
    for n in range(len(wire)):
        parser = RequestParser(True)
        assert parser.feed(wire[:n], [10, 11, 12, 13] if n >= 2 else []) is None


# ---------------------------------------------------------------- hand-over (server -> spare)

HO_ENV = [(b"PATH", b"/usr/bin:/bin"), (b"EMPTY", b""), (b"EQ", b"x=y"), (b"", b"noname"),
          (b"RAW", b"\xff\xfe\x80")]


def _handover(extended: bool = True, env: list[tuple[bytes, bytes]] | None = None,
              argv: list[bytes] | None = None, umask: int | None = 0o027, flags: int = 5,
              fds: list[int] | None = None) -> Request:
    return Request(extended, fds if fds is not None else ([3, 4, 5, 6] if extended else [3, 4, 5]),
                   HO_ENV if env is None else env, ARGV if argv is None else argv,
                   umask if extended else None, flags, 999)


def _split(wire: bytes) -> tuple[bytes, bytes]:
    size = protocol.HANDOVER_HEAD.size
    return wire[:size], wire[size:]


def test_handover_encoding_matches_the_spec() -> None:
    """The bytes as the docstring words them, built independently of the encoder."""
    req = _handover(env=[(b"A", b"1"), (b"B", b"")], argv=[b"py", b"s", b""])
    wire = protocol.encode_handover(req, client_pid=4242, with_env=True)
    argv_blob, env_blob = b"py\0s\0\0", b"A=1\0B=\0"
    head = (b"PH" + bytes([4, 1 | 2 | 4]) + struct.pack(">IIIIII", 0o027, 5, 4242,
                                                          len(argv_blob), len(env_blob), 0))
    assert len(head) == 28 == protocol.HANDOVER_HEAD.size
    assert wire == head + argv_blob + env_blob


@pytest.mark.parametrize("extended", [True, False])
@pytest.mark.parametrize("with_env", [True, False])
def test_handover_round_trip(extended: bool, with_env: bool) -> None:
    req = _handover(extended)
    wire = protocol.encode_handover(req, client_pid=31337, with_env=with_env)
    head, body = _split(wire)
    assert protocol.decode_handover_head(head) == len(body)
    got, got_env = protocol.decode_handover(head, body, list(req.fds))
    assert got_env is with_env
    assert (got.extended, got.fds, got.argv, got.umask, got.flags, got.client_pid) == (
        extended, req.fds, ARGV, 0o027 if extended else None, 5, 31337)
    assert got.env == (HO_ENV if with_env else [])


def test_handover_round_trip_of_edge_values() -> None:
    """A lone interpreter, an empty environment sent on purpose, umask 0, every flag bit."""
    req = _handover(env=[], argv=[b"/usr/bin/python3"], umask=0, flags=0xFFFFFFFF)
    head, body = _split(protocol.encode_handover(req, client_pid=0xFFFFFFFF, with_env=True))
    got, with_env = protocol.decode_handover(head, body, [7, 8, 9, 10])
    assert with_env and got.env == [] and got.argv == [b"/usr/bin/python3"]
    assert (got.umask, got.flags, got.client_pid) == (0, 0xFFFFFFFF, 0xFFFFFFFF)


@pytest.mark.parametrize(("req", "match"), [
    (_handover(argv=[]), "no interpreter"),
    (_handover(argv=[b"py", b"a\0b"]), "argument contains a NUL"),
    (_handover(env=[(b"A", b"x\0y")]), "environment entry contains a NUL"),
    (_handover(env=[(b"A\0B", b"x")]), "environment entry contains a NUL"),
    (_handover(env=[(b"A=B", b"x")]), "environment name with '='"),
])
def test_handover_encoder_refuses_what_cannot_round_trip(req: Request, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.encode_handover(req, client_pid=1, with_env=True)


def test_handover_truncated_anywhere_is_a_clear_error() -> None:
    wire = protocol.encode_handover(_handover(), client_pid=1, with_env=True)
    head, body = _split(wire)
    for n in range(len(head)):
        with pytest.raises(ProtocolError, match=rf"truncated head \({n} of 28 bytes\)"):
            protocol.decode_handover_head(head[:n])
    for n in range(len(body)):
        with pytest.raises(ProtocolError, match=f"body of {n} bytes, expected {len(body)}"):
            protocol.decode_handover(head, body[:n], [3, 4, 5, 6])


def _head(magic: bytes = b"PH", nfds: int = 4, bits: int = 7, umask: int = 0o22,
          argv_len: int = 3, env_len: int = 0, npassed: int = 0) -> bytes:
    return struct.pack(">2sBBIIIIII", magic, nfds, bits, umask, 0, 1, argv_len, env_len,
                       npassed)


@pytest.mark.parametrize(("head", "match"), [
    (_head(magic=b"PF"), "bad magic"),
    (b"\xff" * 28, "bad magic"),
    (_head(npassed=protocol.MAX_PASSED_FDS + 1), "passed fds"),
    (_head(bits=0, nfds=3, npassed=1), "1 passed fds"),
    (_head(bits=8), "unknown bits 0x08"),
    (_head(bits=0x80 | 1), "unknown bits"),
    (_head(nfds=3), "3 fds announced, a call has 4"),
    (_head(bits=0, nfds=4), "4 fds announced, a call has 3"),
    (_head(umask=0o1000), "bad umask"),
    (_head(argv_len=0), "bad lengths"),
    (_head(argv_len=protocol.MAX_MESSAGE + 1), "bad lengths"),
    (_head(env_len=protocol.MAX_MESSAGE + 1), "bad lengths"),
    (_head(bits=1 | 4, env_len=4), "environment bytes without the environment bit"),
])
def test_handover_garbage_head(head: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_handover_head(head)


@pytest.mark.parametrize(("body", "env_len", "match"), [
    (b"py\0s", 0, "argv without its trailing NUL"),
    (b"py\0A=1", 4, "argv without its trailing NUL"),
    (b"py\0A=1", 3, "environment without its trailing NUL"),
    (b"py\0NOEQ\0", 5, "environment entry without '='"),
])
def test_handover_garbage_body(body: bytes, env_len: int, match: str) -> None:
    head = _head(argv_len=len(body) - env_len, env_len=env_len)
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_handover(head, body, [3, 4, 5, 6])


@pytest.mark.parametrize("fds", [[], [3, 4, 5], [3, 4, 5, 6, 7]])
def test_handover_with_the_wrong_number_of_fds(fds: list[int]) -> None:
    head, body = _split(protocol.encode_handover(_handover(), client_pid=1, with_env=False))
    with pytest.raises(ProtocolError, match=f"expected 4 fds, got {len(fds)}"):
        protocol.decode_handover(head, body, fds)


# ---------------------------------------------------------------- envspec


def test_envspec_build_format() -> None:
    assert envspec.build(1700000000, 5, 3, 4, 5, 6) == "v1,1700000000.000000005 3,4,5,6"


@pytest.mark.parametrize(("sec", "nsec", "fds"), [
    (0, 0, (3, 4, 5, 6)),
    (1700000000, 123456789, (10, 4, 99, 7)),
    (2**40, 999_999_999, (1000, 1001, 1002, 1003)),
])
def test_envspec_round_trip(sec: int, nsec: int, fds: tuple[int, int, int, int]) -> None:
    spec = envspec.parse(envspec.build(sec, nsec, *fds))
    assert spec.birth_ns == sec * 1_000_000_000 + nsec
    assert spec.fds() == fds
    assert (spec.listen, spec.call, spec.watch_in, spec.watch_err) == fds


def test_envspec_extra_words_and_items_are_ignored() -> None:
    spec = envspec.parse("v1,12.000000034,future,x 7,8,9,10,11,zz third word  and more")
    assert spec.birth_ns == 12_000_000_034
    assert spec.fds() == (7, 8, 9, 10)


@pytest.mark.parametrize(("value", "match"), [
    ("", "too few words"),
    ("v1,1.000000000", "too few words"),
    ("v2,1.000000000 3,4,5,6", "protocol 'v2' is not v1"),
    ("V1,1.000000000 3,4,5,6", "is not v1"),
    (" v1,1.000000000 3,4,5,6", "protocol '' is not v1"),
    ("v1 3,4,5,6", "no socket time"),
    ("v1,1 3,4,5,6", "is not SECS.NNNNNNNNN"),
    ("v1,1.5 3,4,5,6", "is not SECS.NNNNNNNNN"),
    ("v1,1.12345678 3,4,5,6", "is not SECS.NNNNNNNNN"),
    ("v1,1.1234567890 3,4,5,6", "is not SECS.NNNNNNNNN"),
    ("v1,x.000000000 3,4,5,6", "seconds 'x' is not a number"),
    ("v1,.000000000 3,4,5,6", "seconds '' is not a number"),
    ("v1,-1.000000000 3,4,5,6", "seconds '-1' is not a number"),
    ("v1,1.00000000x 3,4,5,6", "nanoseconds '00000000x' is not a number"),
    ("v1,1.0000000\u0661\u0662 3,4,5,6", "nanoseconds .* is not a number"),
    ("v1,1.000000000 3,4,5", "too few fds"),
    ("v1,1.000000000  3,4,5,6", "too few fds"),
    ("v1,1.000000000 3,4,x,6", "fd 'x' is not a number"),
    ("v1,1.000000000 3,4,,6", "fd '' is not a number"),
    ("v1,1.000000000 3,4,-5,6", "fd '-5' is not a number"),
    ("v1,1.000000000 3,\uff14,5,6", "is not a number"),
    ("v1,1.000000000 3,4,4,6", "four distinct numbers >= 3"),
    ("v1,1.000000000 3,4,5,2", "four distinct numbers >= 3"),
    ("v1,1.000000000 0,4,5,6", "four distinct numbers >= 3"),
])
def test_envspec_malformed(value: str, match: str) -> None:
    with pytest.raises(EnvSpecError, match=match) as info:
        envspec.parse(value)
    text = str(info.value)
    assert text.startswith(f"PREFORK_INTERP={value!r}: "), text
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- passed fds (issue 12, item 6)


def test_ext_block_with_passed_fds() -> None:
    """The numbers follow the 12 fixed bytes; an old reader (``decode_ext``) ignores them."""
    enc = protocol.encode_ext(0o022, 0, 77, [3, 63, 1000])
    assert enc[4:] == struct.pack(">IIIIIII", 0o022, 0, 77, 3, 3, 63, 1000)
    assert protocol.decode_ext(enc[4:]) == (0o022, 0, 77)
    assert protocol.decode_ext_passed(enc[4:]) == (3, 63, 1000)
    assert protocol.decode_ext_passed(protocol.encode_ext(0o022, 0, 77)[4:]) == ()
    assert protocol.encode_ext(0o022, 0, 77, []) == protocol.encode_ext(0o022, 0, 77)


@pytest.mark.parametrize(("tail", "match"), [
    (struct.pack(">II", 2, 3), "2 passed fd numbers announced, 1 there"),
    (struct.pack(">II", 1, 2), "bad passed fd numbers"),
    (struct.pack(">III", 2, 5, 5), "bad passed fd numbers"),
    (struct.pack(">II", 1, 0x80000000), "bad passed fd numbers"),
    (struct.pack(">I", protocol.MAX_PASSED_FDS + 1), "at most"),
])
def test_ext_block_bad_passed_fds(tail: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_ext_passed(struct.pack(">III", 0, 0, 1) + tail)


@pytest.mark.parametrize(("count", "chunks"), [(0, 0), (1, 1), (253, 1), (254, 2), (506, 2),
                                               (507, 3)])
def test_fd_chunks_follow_scm_max_fd(count: int, chunks: int) -> None:
    assert protocol.fd_chunks(count) == chunks


def _x1_wire_with_passed(passed: list[int]) -> tuple[bytes, dict[int, list[int]]]:
    """An x1 request passing ``passed``: fds 10..13 on byte 1, then 100+i on the chunks."""
    tail = protocol.encode_request_x1_tail(ENV, ARGV, 0o022, 0, 4242, passed)
    wire = b"\x01\0" + tail + b"\0" * protocol.fd_chunks(len(passed))
    fds_at = {1: [10, 11, 12, 13]}
    for c in range(protocol.fd_chunks(len(passed))):
        lo = c * protocol.SCM_MAX_FD
        fds_at[len(b"\x01\0" + tail) + c] = [100 + i for i in
                                             range(lo, min(lo + protocol.SCM_MAX_FD,
                                                           len(passed)))]
    return wire, fds_at


@pytest.mark.parametrize("count", [0, 1, 3, 253, 254, 600])
def test_request_with_passed_fds_in_any_chunking(count: int) -> None:
    passed = list(range(3, 3 + count))
    wire, fds_at = _x1_wire_with_passed(passed)
    for chunk in (None, 1, 7):
        r = _feed_all(RequestParser(True, True), wire, fds_at, chunk)
        assert r is not None
        assert r.passed == tuple(passed)
        assert r.fds == [10, 11, 12, 13, *range(100, 100 + count)]
        env = [tuple(e.split(b"=", 1)) for e in ENV]
        assert (r.umask, r.client_pid, r.env, r.argv) == (0o022, 4242, env, ARGV)


def test_passed_fds_without_the_offer_are_refused() -> None:
    """A server that did not offer the token takes 4 fds, as before: more is an error."""
    wire, fds_at = _x1_wire_with_passed([3])
    with pytest.raises(ProtocolError, match="5 fds received, expected 4"):
        _feed_all(RequestParser(True, False), wire, fds_at, len(wire))


def test_passed_fds_on_the_wrong_byte_are_refused() -> None:
    wire, _ = _x1_wire_with_passed([3, 4])
    with pytest.raises(ProtocolError, match="6 fds received, expected 4"):
        _feed_all(RequestParser(True, True), wire, {1: [10, 11, 12, 13, 14, 15]}, 1)
    with pytest.raises(ProtocolError, match="5 fds received, expected 6"):
        _feed_all(RequestParser(True, True), wire, {1: [10, 11, 12, 13], len(wire) - 1: [14]},
                  None)


def test_handover_round_trip_with_passed_fds() -> None:
    passed = (3, 9, 63)
    req = Request(True, [20, 21, 22, 23, 24, 25, 26], HO_ENV, ARGV, 0o022, 0, 1, passed)
    head, body = _split(protocol.encode_handover(req, client_pid=5, with_env=False))
    assert protocol.decode_handover_head(head) == len(body)
    assert protocol.handover_passed_count(head) == 3
    got, _ = protocol.decode_handover(head, body, list(req.fds))
    assert got.passed == passed and got.fds == req.fds and got.argv == ARGV
    with pytest.raises(ProtocolError, match="expected 7 fds, got 4"):
        protocol.decode_handover(head, body, [20, 21, 22, 23])
