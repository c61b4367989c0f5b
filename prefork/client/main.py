"""prefork-interp: the client, used in ``#!`` lines.  This module is the hot path.

It runs on every call, so it imports only low-level modules (``_socket``, ``_signal``,
``select``, ``os``, ``sys``, ``_struct`` via the codec, ``_sha256`` via paths); the cold path
(starting a server) lives in ``prefork.client.start`` and is imported only when needed.

Usages (as the reference)::

    prefork-interp  [OPTION ..] INTERP  [SCRIPT [ARGS ...]]
    prefork-interp  [OPTION,..],INTERP[,INTERP-ARG,..]  SCRIPT [ARGS ...]      (#! form)
    prefork-interp '[OPTION ..] INTERP [INTERP-ARG ..]'  SCRIPT [ARGS ...]

Exit status: the script's, or death by the same signal; 127 when prefork-interp itself fails.
"""

from __future__ import annotations

import _signal
import _socket
import os
import select
import sys

from prefork.common import fdio, paths, protocol

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

#: Signals forwarded to the executor under extension x1 (catchable, sent by callers).
FORWARD = (
    _signal.SIGHUP, _signal.SIGINT, _signal.SIGQUIT, _signal.SIGUSR1, _signal.SIGUSR2,
    _signal.SIGPIPE, _signal.SIGALRM, _signal.SIGTERM, _signal.SIGCONT, _signal.SIGTSTP,
    _signal.SIGTTIN, _signal.SIGTTOU, _signal.SIGWINCH, _signal.SIGURG, _signal.SIGXCPU,
    _signal.SIGXFSZ, _signal.SIGVTALRM, _signal.SIGPROF, _signal.SIGPWR,
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
                os._exit(0)
            elif w == "--version":
                from prefork import __version__

                sys.stdout.write(f"prefork-interp (Python) {__version__}\n")
                sys.stdout.flush()
                os._exit(0)
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
                    opts.ident_opts.append((c, os.fsencode(val)))
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


# ------------------------------------------------------------------ connecting


def _greeting(sock: _socket.socket) -> frozenset[bytes] | None:
    """Read the greeting; the offered extension tokens, or None if the server went away."""
    try:
        head = fdio.read_exactly(sock, protocol.GREETING_HEAD.size)
        xlen = protocol.decode_greeting_head(head)
        xdata = fdio.read_exactly(sock, xlen) if xlen else b""
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
        raise ClientError(f"connect to {sock_path}: {e.strerror}") from None
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
        fd = os.open("/proc/self/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return [k + b"=" + v for k, v in os.environb.items()]
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return [e for e in data.split(b"\0") if b"=" in e]


def send_request(sock: _socket.socket, opts: Options, extended: bool, closed: int) -> None:
    """Send the call: signalling byte, fds, message (and the x1 extension block)."""
    argv = [os.fsencode(opts.interp)]
    if opts.script is not None:
        argv.append(os.fsencode(opts.script))
    argv.extend(os.fsencode(a) for a in opts.args)
    env = _caller_env()
    if extended:
        cwd_fd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        umask = os.umask(0o022)
        os.umask(umask)
        try:
            sock.sendall(b"\x01")
            fdio.send_fds(sock, b"\0", [0, 1, 2, cwd_fd])
        finally:
            os.close(cwd_fd)
        sock.sendall(protocol.encode_request_x1_tail(env, argv, umask, closed, os.getpid()))
    else:
        sock.sendall(b"\0")
        for fd in (0, 1, 2):
            fdio.send_fds(sock, b"\0", [fd])
        sock.sendall(protocol.encode_request_v1_tail(env, argv))


def _noop(signum: int, frame: object) -> None:
    """Handlers only wake the loop (through the wakeup fd)."""


def _x1_loop(sock: _socket.socket, wake_r: int) -> int:
    pending = b""
    while True:
        ready = select.select([sock, wake_r], [], [])[0]
        if wake_r in ready:
            try:
                sigs = os.read(wake_r, 512)
            except BlockingIOError:
                sigs = b""
            out = b"".join(protocol.encode_record(protocol.REC_SIGNAL, s) for s in sigs
                           if s != _signal.SIGCHLD)
            if out:
                try:
                    sock.sendall(out)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the final status (or EOF) is still to be read
        if sock in ready:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                raise ClientError("the server went away during the call (was it killed?)")
            recs, pending = protocol.decode_records(pending + data)
            for tag, value in recs:
                if tag == protocol.REC_STATUS:
                    return value
                if tag == protocol.REC_STOPPED:
                    _stop_self(value)


def _stop_self(sig: int) -> None:
    """The executor stopped: stop ourselves the same way, so the shell sees a stopped job."""
    if sig not in STOPS:
        sig = _signal.SIGSTOP
    else:
        _signal.signal(sig, _signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    if sig != _signal.SIGSTOP:
        _signal.signal(sig, _noop)


def wait_v1(sock: _socket.socket) -> int:
    """Read the final wait status (v1)."""
    try:
        return protocol.decode_status(fdio.read_exactly(sock, 4))
    except (EOFError, ConnectionResetError):
        raise ClientError("monitor process quit unexpectedly (the server went away "
                          "during the call)") from None


def propagate(status: int) -> None:
    """Exit as the executor did: same exit code, or death by the same signal."""
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        import resource

        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (ValueError, OSError):
            pass
        _signal.set_wakeup_fd(-1)
        _signal.signal(sig, _signal.SIG_DFL)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        raise ClientError(f"script died of signal {sig}, which could not be passed on")
    raise ClientError(f"weird wait status {status:#x}")


# ------------------------------------------------------------------ main


def _fix_std_fds() -> int:
    """Put /dev/null on any of fds 0/1/2 the caller left closed (so that no socket of ours
    lands there); return the x1 flags saying which were closed."""
    closed = 0
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed |= 1 << fd
    if closed:
        for fd in (0, 1, 2):
            if closed & (1 << fd):
                got = os.open(os.devnull, os.O_RDWR)
                if got != fd:
                    os.dup2(got, fd)
                    os.close(got)
    return closed


def run(argv: list[str]) -> int:
    """Everything but the final propagation; returns the executor's wait status."""
    closed = _fix_std_fds()
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    opts = parse_args(argv)
    base = paths.run_base()
    while True:
        if opts.ident is not None:
            ident = opts.ident
        else:
            extra = [b"a" + os.fsencode(a) for a in opts.interp_args]
            if opts.any_cwd:
                extra.append(b"any-cwd")
            ident = paths.compute_ident(
                base, os.fsencode(opts.interp),
                None if opts.script is None else os.fsencode(opts.script),
                opts.ident_opts, cwd=None if opts.any_cwd else ".", extra=extra)
        sock_path = paths.socket_path(base, ident)
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
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        for sig in FORWARD:
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
    except paths.RunDirError as e:
        msg = f"prefork-interp: {e}\n"
    except (BrokenPipeError, ConnectionResetError) as e:
        msg = f"prefork-interp: the server went away during the call ({e.strerror})\n"
    except KeyboardInterrupt:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        os.kill(os.getpid(), _signal.SIGINT)
        msg = "prefork-interp: interrupted\n"
    try:
        os.write(2, msg.encode("utf-8", "backslashreplace"))
    finally:
        os._exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
