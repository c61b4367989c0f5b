"""prefork-interp: the client, used in ``#!`` lines.  This module is the hot path.

It runs on every call, so the warm path imports only modules built into the interpreter or
small extension modules: ``_signal``, ``_socket``, ``posix``, ``select``, ``sys``, ``_sha2``
(``_sha256`` before 3.12) and the codec (``prefork.common.protocol``, with ``_struct``).  Not
even ``os``: importing it (and ``_collections_abc`` with it) costs more than a millisecond of
the client's few.  So the warm path has lean copies of the run-directory check, the ident
(``prefork.common.paths``) and fd passing (``prefork.common.fdio``); anything unusual (a run
directory to create or refuse, an ident too long) goes to the full versions, which also word
the errors, and tests check that both give the same answers.  The cold path (starting a
server) lives in ``prefork.client.start`` and is imported only when needed.

Usages (as the reference)::

    prefork-interp  [OPTION ..] INTERP  [SCRIPT [ARGS ...]]
    prefork-interp  [OPTION,..],INTERP[,INTERP-ARG,..]  SCRIPT [ARGS ...]      (#! form)
    prefork-interp '[OPTION ..] INTERP [INTERP-ARG ..]'  SCRIPT [ARGS ...]

Exit status: the script's, or death by the same signal; 127 when prefork-interp itself fails.
"""

from __future__ import annotations

import _signal
import _socket
import posix
import select
import sys

from prefork.common import protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from hashlib import sha256 as _sha256
elif sys.version_info >= (3, 12):
    from _sha2 import sha256 as _sha256
else:
    from _sha256 import sha256 as _sha256

USAGE = """\
usage: #!/usr/bin/prefork-interp -U[,OPTION..],INTERP[,INTERP-ARG..]
       prefork-interp [OPTION ..] -U INTERP [SCRIPT [ARGS ...]]

Runs SCRIPT with INTERP through a per-user server that keeps one initialised copy of the
script alive and forks it for each call (the script calls prefork.initialisation_complete()).

options:
  -U            unlaundered mode (mandatory): the script sees all arguments and environment
  -E VAR        the server identity includes environment variable VAR (or its absence)
  -G STRING     the server identity includes STRING
  -g IDENT      use IDENT as the server identity instead of the computed hash
  -f            force a fresh server (the old one finishes its calls and quits)
  --kill        stop the server for this identity; run nothing
  --any-cwd     share one server across working directories (needs our script side;
                a reference server falls back to one server per directory)
  --help        show this help
  --version     show the version

environment: PREFORK_INTERP_RUNDIR (run directory), PREFORK_INTERP_SETUP_TIMEOUT (seconds,
default 120), PREFORK_INTERP_WATCHER (watcher executable).
exit status: the script's own (or death by the same signal); 127 if prefork-interp fails.
"""

EXIT_FAILED = 127

#: Signals forwarded to the executor under extension x1: every signal a caller can send and
#: a script can catch, but the synchronous faults (SIGSEGV, SIGBUS, SIGILL, SIGFPE: a
#: handler for a real fault of the client's own would loop on the faulting instruction).
#: SIGCHLD too: the client has no child left by then, so any it gets was sent to it.
FORWARD = (
    _signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
    _signal.SIGPIPE, _signal.SIGALRM, _signal.SIGTERM, _signal.SIGCONT, _signal.SIGTSTP,
    _signal.SIGTTIN, _signal.SIGTTOU, _signal.SIGWINCH, _signal.SIGURG, _signal.SIGXCPU,
    _signal.SIGXFSZ, _signal.SIGVTALRM, _signal.SIGPROF, _signal.SIGPWR, _signal.SIGCHLD,
    _signal.SIGABRT, _signal.SIGSYS, _signal.SIGTRAP, _signal.SIGIO, _signal.SIGSTKFLT,
    *range(_signal.SIGRTMIN, _signal.SIGRTMAX + 1),
)
STOPS = (_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU)


class ClientError(Exception):
    """prefork-interp itself failed; the text is the whole message."""


class Options:
    """What the command line asked for."""

    __slots__ = ("any_cwd", "args", "force", "ident", "ident_opts", "interp", "interp_args",
                 "kill", "mode", "script")

    def __init__(self) -> None:
        self.mode = ""
        self.ident_opts: list[tuple[str, bytes]] = []
        self.ident: str | None = None
        self.force = False
        self.kill = False
        self.any_cwd = False
        self.interp = ""
        self.interp_args: list[str] = []
        self.script: str | None = None
        self.args: list[str] = []


def _parse_words(words: list[str], opts: Options, combined: bool) -> list[str]:
    """Consume options from ``words``; return the words from the interpreter on."""
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--":
            i += 1
            break
        if not w.startswith("-") or w == "-":
            break
        if w.startswith("--"):
            if w == "--kill":
                opts.kill = True
            elif w == "--any-cwd":
                opts.any_cwd = True
            elif w == "--help":
                sys.stdout.write(USAGE)
                sys.stdout.flush()
                posix._exit(0)
            elif w == "--version":
                from prefork import __version__

                sys.stdout.write(f"prefork-interp (Python) {__version__}\n")
                sys.stdout.flush()
                posix._exit(0)
            else:
                raise ClientError(f"unknown option {w}")
            i += 1
            continue
        j = 1
        while j < len(w):
            c = w[j]
            if c in "EGg":
                val = w[j + 1:]
                if not val:
                    i += 1
                    if i >= len(words):
                        raise ClientError(f"option -{c} needs an argument")
                    val = words[i]
                if c == "g":
                    opts.ident = val
                else:
                    opts.ident_opts.append((c, _fsencode(val)))
                break
            if c == "U":
                opts.mode = "U"
            elif c == "f":
                opts.force = True
            else:
                raise ClientError(f"unknown option -{c}")
            j += 1
        i += 1
    rest = words[i:]
    if combined and len(rest) > 1:
        opts.interp_args = rest[1:]
        return rest[:1]
    return rest


def parse_args(argv: list[str]) -> Options:
    """The three usage forms of the reference; words after the interpreter in the combined
    forms are the interpreter's own arguments (the reference gets this wrong)."""
    opts = Options()
    first = argv[1] if len(argv) > 1 else ""
    if first.startswith("-") and ("," in first or " " in first):
        sep = "," if "," in first else " "
        head = _parse_words([w for w in first.split(sep) if w != ""], opts, True)
        if not head:
            raise ClientError(f"no interpreter in {first!r}")
        opts.interp = head[0]
        rest = argv[2:]
        if not rest and not opts.kill:
            raise ClientError("no script (the combined form is for #! lines)")
    else:
        rest = _parse_words(argv[1:], opts, False)
        if not rest:
            raise ClientError("no interpreter given (see --help)")
        opts.interp = rest[0]
        rest = rest[1:]
    if rest:
        opts.script = rest[0]
        opts.args = rest[1:]
    if opts.mode != "U":
        raise ClientError("must specify the argument/environment mode -U")
    return opts


# ------------------------------------------------------------------ the warm path's helpers
#
# Lean copies of prefork.common.paths and prefork.common.fdio (see the module docstring):
# tests/test_client_fastpath.py checks them against the originals.

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()
_S_IFMT = 0o170000
_S_IFDIR = 0o040000
_FD_SIZE = 4


def _fsencode(name: str) -> bytes:
    """``os.fsencode`` for a ``str``."""
    return name.encode(_FS_ENCODING, _FS_ERRORS)


def _fsdecode(name: bytes) -> str:
    """``os.fsdecode`` for ``bytes``."""
    return name.decode(_FS_ENCODING, _FS_ERRORS)


def _private_dir(path: bytes, uid: int) -> bool:
    """Is ``path`` a real directory (not a symlink) of ours with no group/other access?"""
    try:
        st = posix.lstat(path)
    except OSError:
        return False
    return st.st_mode & _S_IFMT == _S_IFDIR and st.st_uid == uid and not st.st_mode & 0o077


def _read_small(path: bytes) -> bytes:
    """A small file's contents (``/etc/passwd``, ``/proc`` files), with plain system calls."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_CLOEXEC)
    try:
        chunks = []
        while chunk := posix.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        posix.close(fd)


def _passwd_home(uid: int) -> bytes | None:
    """Our home directory from /etc/passwd, or None (left to ``paths``: NSS, NIS, errors)."""
    want = b"%d" % uid
    try:
        data = _read_small(b"/etc/passwd")
    except OSError:
        return None
    for line in data.split(b"\n"):
        if line.startswith((b"+", b"-")):
            return None
        fields = line.split(b":")
        if len(fields) >= 7 and fields[2] == want:
            return fields[5]
    return None


def _fast_run_base(environ: Mapping[bytes, bytes]) -> str | None:
    """``paths.run_base()`` when the run directory already exists and passes the check;
    None when anything else is the case (then ``paths`` creates it, or words the refusal)."""
    uid = posix.getuid()
    override = environ.get(b"PREFORK_INTERP_RUNDIR")
    if override:
        if not override.startswith(b"/"):
            return None
        base = override.rstrip(b"/") or b"/"
        return _fsdecode(base) if _private_dir(base, uid) else None
    user_dir = b"/var/run/user/%d" % uid
    try:
        st = posix.lstat(user_dir)
    except FileNotFoundError:
        home = _passwd_home(uid)
        if home is None:
            return None
        node = posix.uname().nodename.encode(_FS_ENCODING, _FS_ERRORS)
        base = home + b"/.prefork-interp/" + node.split(b".", 1)[0][:32]
    except OSError:
        return None
    else:
        if not (st.st_mode & _S_IFMT == _S_IFDIR and st.st_uid == uid
                and not st.st_mode & 0o077):
            return None
        base = user_dir + b"/prefork-interp"
    return _fsdecode(base) if _private_dir(base, uid) else None


def _run_base() -> str:
    """The run base directory, checked (``paths.run_base``, fast when nothing is amiss)."""
    base = _fast_run_base(posix.environ)
    if base is not None:
        return base
    from prefork.common import paths

    return paths.run_base()


def _u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def _utsname_raw() -> bytes:
    """The raw ``struct utsname`` of glibc, as ``paths._utsname_raw``."""
    u = posix.uname()
    try:
        domain = _read_small(b"/proc/sys/kernel/domainname").removesuffix(b"\n")
    except OSError:
        domain = b"(none)"
    fields = [_fsencode(f) for f in (u.sysname, u.nodename, u.release, u.version, u.machine)]
    fields.append(domain)
    return b"".join(f[:64].ljust(65, b"\0") for f in fields)


def _compute_ident(base: str, interp: bytes, script: bytes | None,
                   ident_opts: Sequence[tuple[str, bytes]], cwd: str | None,
                   extra: Sequence[bytes]) -> str:
    """``paths.compute_ident`` (the bytes of ``paths.ident_bytes``, sha256, cut)."""
    length = min(64, 108 - len(_fsencode(base)) - 12)
    if length < 33 or any(b"\0" in x for x in (interp, script or b"", *extra)) or any(
            kind not in ("E", "G") or b"\0" in item for kind, item in ident_opts):
        from prefork.common import paths  # words the error

        return paths.compute_ident(base, interp, script, ident_opts, cwd=cwd, extra=extra)
    parts = [b"\x01u", _u64(390), b"u", _utsname_raw()]
    if cwd is not None:
        st = posix.stat(cwd)
        parts += [b".", _u64(st.st_dev), b"i", _u64(st.st_ino)]
    st = posix.stat("/")
    parts += [b"/", _u64(st.st_dev), b"i", _u64(st.st_ino)]
    environ = posix.environ
    for kind, item in ident_opts:
        parts += [kind.encode(), item, b"\0"]
        if kind == "E":
            value = environ.get(item)
            parts += [b"\0"] if value is None else [b"v", value, b"\0"]
    parts += [b"i", interp, b"\0"]
    if script is not None:
        parts += [b"s", script, b"\0"]
    for item in extra:
        parts += [b"X", item, b"\0"]
    return _sha256(b"".join(parts)).hexdigest()[:length]


def _read_exactly(sock: _socket.socket, n: int) -> bytes:
    """``fdio.read_exactly``: exactly ``n`` bytes; ``EOFError`` if the peer closes first."""
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError(f"connection closed with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _send_fds(sock: _socket.socket, data: bytes, fds: Sequence[int]) -> None:
    """``fdio.send_fds``: ``data`` (at least one byte) carrying ``fds`` by SCM_RIGHTS."""
    anc = [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
            b"".join(fd.to_bytes(_FD_SIZE, sys.byteorder) for fd in fds))]
    sent = sock.sendmsg([data], anc)
    if sent != len(data):
        sock.sendall(data[sent:])


# ------------------------------------------------------------------ connecting


def _greeting(sock: _socket.socket) -> frozenset[bytes] | None:
    """Read the greeting; the offered extension tokens, or None if the server went away."""
    try:
        head = _read_exactly(sock, protocol.GREETING_HEAD.size)
        xlen = protocol.decode_greeting_head(head)
        xdata = _read_exactly(sock, xlen) if xlen else b""
    except (EOFError, ConnectionResetError):
        return None
    except protocol.ProtocolError as e:
        raise ClientError(f"server sent a bad greeting: {e}") from None
    return protocol.decode_offer(xdata)


def try_connect(sock_path: str) -> tuple[_socket.socket, frozenset[bytes]] | None:
    """Connect to a running server and read its greeting; None if there is none."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        sock.connect(sock_path)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as e:
        sock.close()
        raise ClientError(f"connect to {sock_path}: {e.strerror or e}") from None
    offer = _greeting(sock)
    if offer is None:
        sock.close()
        return None
    return sock, offer


# ------------------------------------------------------------------ the call


def _caller_env() -> list[bytes]:
    """The environment exactly as the caller passed it (``/proc/self/environ``: untouched
    by anything the interpreter did at start-up, such as locale coercion)."""
    try:
        fd = posix.open("/proc/self/environ", posix.O_RDONLY | posix.O_CLOEXEC)
    except OSError:
        return [k + b"=" + v for k, v in posix.environ.items()]
    try:
        chunks = []
        while True:
            chunk = posix.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        posix.close(fd)
    data = b"".join(chunks)
    return [e for e in data.split(b"\0") if b"=" in e]


def send_request(sock: _socket.socket, opts: Options, extended: bool, closed: int) -> None:
    """Send the call: signalling byte, fds, message (and the x1 extension block)."""
    argv = [_fsencode(opts.interp)]
    if opts.script is not None:
        argv.append(_fsencode(opts.script))
    argv.extend(_fsencode(a) for a in opts.args)
    env = _caller_env()
    if extended:
        cwd_fd = posix.open(".", posix.O_PATH | posix.O_DIRECTORY | posix.O_CLOEXEC)
        umask = posix.umask(0o022)
        posix.umask(umask)
        try:
            sock.sendall(b"\x01")
            _send_fds(sock, b"\0", [0, 1, 2, cwd_fd])
        finally:
            posix.close(cwd_fd)
        sock.sendall(protocol.encode_request_x1_tail(env, argv, umask, closed, posix.getpid()))
    else:
        sock.sendall(b"\0")
        for fd in (0, 1, 2):
            _send_fds(sock, b"\0", [fd])
        sock.sendall(protocol.encode_request_v1_tail(env, argv))


def _noop(signum: int, frame: object) -> None:
    """Handlers only wake the loop (through the wakeup fd)."""


def _x1_loop(sock: _socket.socket, wake_r: int) -> int:
    pending = b""
    executor = 0
    sock_fd = sock.fileno()
    while True:
        ready = select.select([sock_fd, wake_r], [], [])[0]
        if wake_r in ready:
            try:
                sigs = posix.read(wake_r, 512)
            except BlockingIOError:
                sigs = b""
            out = b"".join(protocol.encode_record(protocol.REC_SIGNAL, s) for s in sigs)
            if out:
                try:
                    sock.sendall(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the final status (or EOF) is still to be read
        if sock_fd in ready:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                if executor:
                    # The executor died with its server (PR_SET_PDEATHSIG): leave nothing it
                    # started behind either (its group is still there while any member is).
                    try:
                        posix.killpg(executor, _signal.SIGKILL)
                    except OSError:
                        pass
                raise ClientError("the server went away during the call (was it killed?)")
            recs, pending = protocol.decode_records(pending + data)
            for tag, value in recs:
                if tag == protocol.REC_STATUS:
                    return value
                if tag == protocol.REC_PID:
                    executor = value
                elif tag == protocol.REC_STOPPED:
                    _stop_self(value)


def _stop_self(sig: int) -> None:
    """The executor stopped: stop ourselves the same way, so the shell sees a stopped job."""
    if sig not in STOPS:
        sig = _signal.SIGSTOP
    else:
        _signal.signal(sig, _signal.SIG_DFL)
    posix.kill(posix.getpid(), sig)
    if sig != _signal.SIGSTOP:
        _signal.signal(sig, _noop)


def wait_v1(sock: _socket.socket) -> int:
    """Read the final wait status (v1)."""
    try:
        return protocol.decode_status(_read_exactly(sock, 4))
    except (EOFError, ConnectionResetError):
        raise ClientError("monitor process quit unexpectedly (the server went away "
                          "during the call)") from None


def propagate(status: int) -> None:
    """Exit as the executor did: same exit code, or death by the same signal."""
    if posix.WIFEXITED(status):
        posix._exit(posix.WEXITSTATUS(status))
    if posix.WIFSIGNALED(status):
        sig = posix.WTERMSIG(status)
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ValueError, OSError):
            pass
        _signal.set_wakeup_fd(-1)
        if sig != _signal.SIGKILL:  # SIGKILL can be neither caught nor blocked
            _signal.signal(sig, _signal.SIG_DFL)
            _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
        posix.kill(posix.getpid(), sig)
        raise ClientError(f"script died of signal {sig}, which could not be passed on")
    raise ClientError(f"weird wait status {status:#x}")


# ------------------------------------------------------------------ main


def _fix_std_fds() -> int:
    """Put /dev/null on any of fds 0/1/2 the caller left closed (so that no socket of ours
    lands there); return the x1 flags saying which were closed."""
    closed = 0
    for fd in (0, 1, 2):
        try:
            posix.fstat(fd)
        except OSError:
            closed |= 1 << fd
    if closed:
        for fd in (0, 1, 2):
            if closed & (1 << fd):
                got = posix.open("/dev/null", posix.O_RDWR)
                if got != fd:
                    posix.dup2(got, fd)
                    posix.close(got)
                else:  # open() made it close-on-exec: setup must find it there too
                    posix.set_inheritable(fd, True)
    return closed


def run(argv: list[str]) -> int:
    """Everything but the final propagation; returns the executor's wait status."""
    closed = _fix_std_fds()
    # Signals the caller ignores stay ignored, and are not forwarded: the executor copies
    # our ignored set, as a direct run would have inherited it.  (Python itself ignores
    # SIGPIPE and SIGXFSZ at start-up, so those two cannot tell, and are forwarded.)
    ignored = {s for s in FORWARD if _signal.getsignal(s) == _signal.SIG_IGN}
    ignored -= {_signal.SIGPIPE, _signal.SIGXFSZ}
    if _signal.SIGINT not in ignored:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    opts = parse_args(argv)
    base = _run_base()
    while True:
        if opts.ident is not None:
            ident = opts.ident
        else:
            extra = [b"a" + _fsencode(a) for a in opts.interp_args]
            if opts.any_cwd:
                extra.append(b"any-cwd")
            ident = _compute_ident(
                base, _fsencode(opts.interp),
                None if opts.script is None else _fsencode(opts.script),
                opts.ident_opts, None if opts.any_cwd else ".", extra)
        sock_path = f"{base}/s{ident}"
        conn = None
        if not (opts.force or opts.kill):
            conn = try_connect(sock_path)
        if conn is None:
            from prefork.client import start

            conn = start.connect_or_start(opts, base, ident, sock_path)
        sock, offer = conn
        extended = protocol.X1_TOKEN in offer
        if opts.any_cwd and not extended:
            # A reference server runs every call in its own cwd: use a per-cwd server.
            sock.close()
            opts.any_cwd = False
            continue
        break
    if extended:
        # Install the forwarding handlers before the request goes out: signals that arrive
        # before the executor exists are queued on the wakeup pipe, not lost.
        wake_r, wake_w = posix.pipe2(posix.O_NONBLOCK | posix.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in FORWARD:
            if sig not in ignored:
                _signal.signal(sig, _noop)
        send_request(sock, opts, True, closed)
        return _x1_loop(sock, wake_r)
    send_request(sock, opts, False, closed)
    return wait_v1(sock)


def main() -> None:
    """Entry point of ``prefork-interp``."""
    try:
        status = run(sys.argv)
        propagate(status)
    except ClientError as e:
        msg = f"prefork-interp: {e}\n"
    except (BrokenPipeError, ConnectionResetError) as e:
        msg = f"prefork-interp: the server went away during the call ({e.strerror})\n"
    except KeyboardInterrupt:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        posix.kill(posix.getpid(), _signal.SIGINT)
        msg = "prefork-interp: interrupted\n"
    except Exception as e:
        # paths.RunDirError, from the full run-directory code (imported only when used).
        paths = sys.modules.get("prefork.common.paths")
        if paths is None or not isinstance(e, paths.RunDirError):
            raise
        msg = f"prefork-interp: {e}\n"
    try:
        posix.write(2, msg.encode("utf-8", "backslashreplace"))
    finally:
        posix._exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
