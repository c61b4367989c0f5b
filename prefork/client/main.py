"""prefork-interp: the client, used in ``#!`` lines.  This module is the hot path.

The story of a call, as the reference's: parse the options (``parse_args``); connect to the
server for this script, or start one (``connect_or_spawn``; the cold path, starting a server,
is ``prefork.client.start``, imported only when needed); send the request and wait, passing
signals on under our extension x1 (``prefork.client.wire`` has the wire-level pieces); exit as
the script did (``propagate``).

It runs on every call, so the warm path imports only modules built into the interpreter or
small extension modules: ``_signal``, ``_socket``, ``posix``, ``select``, ``sys``, ``_sha2``
(``_sha256`` before 3.12), ``_struct``, and the ``prefork.common`` modules made for it (the
ident and fast run-directory check, fd passing, the codec, the constants).  Not even ``os``:
importing it (and ``_collections_abc`` with it) costs more than a millisecond of the client's
few.  Anything unusual (a run directory to create or refuse) goes to ``prefork.common.paths``.

Usages (as the reference)::

    prefork-interp  [OPTION ..] INTERP  [SCRIPT [ARGS ...]]
    prefork-interp  [OPTION,..],INTERP[,INTERP-ARG,..]  SCRIPT [ARGS ...]      (#! form)
    prefork-interp '[OPTION ..] INTERP [INTERP-ARG ..]'  SCRIPT [ARGS ...]

Exit status: the script's, or death by the same signal; 127 when prefork-interp itself fails.
"""

import _signal
import _socket
import posix
import select
import sys

from prefork.client.wire import (
    ClientError,
    Connection,
    NoGreeting,
    NotStarted,
    Redirected,
    ScriptEnded,
    peer_creds,
    read_status_v1,
    send_request,
    try_connect,
)
from prefork.common import fdio, protocol
from prefork.common.consts import EXIT_FAILED, FORWARDED_SIGNALS, socket_name
from prefork.common.ident import (
    RunDirError,
    compute_ident,
    context_ident,
    fast_run_base,
    fsencode,
    open_run_dir,
    read_small_file,
    socket_path,
)

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
default 120), PREFORK_INTERP_WATCHER (watcher executable), PREFORK_INTERP_DIRECT (non-empty:
run the script directly, with no server: e.g. when it must prompt on the terminal).
exit status: the script's own (or death by the same signal); 127 if prefork-interp fails.
"""

STOPS = (_signal.SIGTSTP, _signal.SIGTTIN, _signal.SIGTTOU)
#: A call the server never started (see ``NotStarted``) is sent again this many times, then
#: run directly.
NOT_STARTED_RETRIES = 3


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
                    if "/" in val:  # a name in the run directory, never a path
                        raise ClientError(f"-g {val!r}: an ident must not contain '/'")
                    opts.ident = val
                else:
                    opts.ident_opts.append((c, fsencode(val)))
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


def run_base() -> str:
    """The run base directory, checked: at once when it is there and fine, else through
    ``prefork.common.paths``, which creates it, falls back, or words the refusal."""
    base = fast_run_base(posix.environ)
    if base is not None:
        return base
    from prefork.common import paths

    return paths.run_base()


def server_ident(opts: Options, base: str) -> str:
    """``-g IDENT``, or the ident of this interpreter, script, cwd and options."""
    if opts.ident is not None:
        return opts.ident
    extra = [b"a" + fsencode(a) for a in opts.interp_args]
    script = None if opts.script is None else fsencode(opts.script)
    if opts.script == "-m" and opts.args:  # INTERP -m MOD: one server per module
        extra.append(b"m" + fsencode(opts.args[0]))
    if opts.any_cwd:
        extra.append(b"any-cwd")
        if script is not None and opts.script != "-m" and not script.startswith(b"/"):
            # Without the cwd in the ident, a relative path names another script in each
            # directory: the ident has the absolute one (the request keeps what was typed).
            script = posix.getcwdb() + b"/" + script
    return compute_ident(base, fsencode(opts.interp), script, opts.ident_opts,
                         cwd=None if opts.any_cwd else ".", extra=extra)


def connect_or_spawn(opts: Options, base: str) -> Connection:
    """Connect to the server for this call, or start one (the cold path, under the lock).

    Raises ``ScriptEnded`` when a server was to be started and the script ended first.
    """
    # The run directory is opened once and the socket reached through that fd: what the
    # path names cannot change under us (its ancestors are checked in run_base).
    dir_fd, prefix = open_run_dir(base)
    try:
        return _connect_or_spawn(opts, base, prefix)
    finally:
        posix.close(dir_fd)


def _connect_or_spawn(opts: Options, base: str, prefix: str) -> Connection:
    while True:
        ident = server_ident(opts, base)
        force = opts.force
        try:
            conn = None if force else try_connect(f"{prefix}/{socket_name(ident)}",
                                                  socket_path(base, ident))
        except NoGreeting:
            # Accepted but never greeted: a dead server whose listener lives on in some
            # other process.  A fresh one takes over the socket path (the old one, if it
            # is alive after all, finishes its calls and quits, as for -f).
            conn, force = None, True
        if conn is None:
            from prefork.client import start

            conn = start.connect_or_start(base, ident, _setup_argv(opts), force=force)
        sock, offer = conn
        if opts.any_cwd and protocol.X1_TOKEN not in offer:
            # A reference server runs every call in its own cwd: use a per-cwd server.
            sock.close()
            opts.any_cwd = False
            continue
        return conn


def _setup_argv(opts: Options) -> list[str]:
    """What a new server is started with: the interpreter with its own arguments, the script
    and this call's arguments."""
    argv = [opts.interp, *opts.interp_args]
    if opts.script is not None:
        argv.append(opts.script)
    return argv + opts.args


def _request_argv(opts: Options) -> list[bytes]:
    """The request's argv: interpreter, script, arguments (interpreter arguments are in the
    ident, and the server has them already)."""
    argv = [opts.interp] if opts.script is None else [opts.interp, opts.script]
    return [fsencode(a) for a in argv + opts.args]


# ------------------------------------------------------------------ the call


def _noop(signum: int, frame: object) -> None:
    """Handlers only wake the loop (through the wakeup fd)."""


def forward_signals(ignored: set[int]) -> int:
    """Catch every signal to forward (but those the caller ignores); return the read end of
    the wakeup pipe their numbers arrive on.  Done before the request goes out: signals that
    arrive before the executor exists are queued on the pipe, not lost."""
    wake_r, wake_w = posix.pipe2(posix.O_NONBLOCK | posix.O_CLOEXEC)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    for sig in FORWARDED_SIGNALS:
        if sig not in ignored:
            _signal.signal(sig, _noop)
    return wake_r


def x1_call_loop(sock: _socket.socket, wake_r: int, resend: bytes = b"",
                 retry: bool = False) -> int:
    """Under x1: pass our signals on as ``S`` records, follow the executor (``P``), its
    stops (``T``) and continues (``C``); return the final wait status (``W``).

    With ``retry`` (the server offered ``RETRY_TOKEN``), the connection ending before any
    ``P`` record raises ``NotStarted``, with the signals passed on meanwhile (``resend``:
    those of an earlier attempt, sent first).

    A stopped executor stops us the same way, whoever stopped it (the job is stopped, as
    in a direct run).  ``C 1`` says someone else continued it and the server sends us a
    SIGCONT too (we may be stopped): that SIGCONT is not passed back on to the script.
    Records are read before signals, and a stop is made only with no record waiting, so
    a continue that follows a stop at once is never missed."""
    pending = b""
    executor = 0
    stop_sig = 0  # a stop to make once the records that came with it are read
    cont_owed = 0  # SIGCONTs the server sent us (``C 1``), not to be passed on
    named = False  # a P record came: the call may have started
    sent = resend  # signal records sent before it
    if resend:
        _send_records(sock, resend)
    sock_fd = sock.fileno()
    while True:
        ready = select.select([sock_fd, wake_r], [], [])[0]
        if sock_fd in ready:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                if retry and not named:
                    raise NotStarted(sent)
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
                    named = True
                    executor = value if _our_executor(sock, value) else 0
                elif tag == protocol.REC_REDIRECT and not executor:
                    raise Redirected(value)
                elif tag == protocol.REC_STOPPED:
                    stop_sig = value
                elif tag == protocol.REC_CONTINUED:
                    stop_sig = 0
                    if value:
                        cont_owed += 1
        if wake_r in ready:
            try:
                sigs = posix.read(wake_r, 512)
            except BlockingIOError:
                sigs = b""
            out = []
            for s in sigs:
                if s == _signal.SIGCONT and cont_owed:
                    cont_owed -= 1  # the server's, for a continue the executor already had
                    continue
                out.append(protocol.encode_record(protocol.REC_SIGNAL, s))
            if out:
                if not named:
                    sent += b"".join(out)
                _send_records(sock, b"".join(out))
        if stop_sig and not select.select([sock_fd], [], [], 0)[0]:
            _stop_self(stop_sig)
            stop_sig = 0


def _send_records(sock: _socket.socket, records: bytes) -> None:
    try:
        sock.sendall(records)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the final status (or EOF) is still to be read


def _our_executor(sock: _socket.socket, pid: int) -> bool:
    """Whether ``pid`` (a ``P`` record) is an executor of the server at the other end of
    ``sock``, so that its process group may be signalled: a process of ours, leading its own
    group, a child of the peer (``SO_PEERCRED``; or the peer is us: the first call, over the
    socketpair to the server we started)."""
    me = posix.getpid()
    if pid <= 1 or pid == me or pid == posix.getpgrp():
        return False
    try:
        peer = peer_creds(sock)[0]
        st = posix.stat(f"/proc/{pid}")
        fields = read_small_file(f"/proc/{pid}/stat").rsplit(b")", 1)[1].split()
        ppid, pgrp = int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return False
    return st.st_uid == posix.getuid() and pgrp == pid and peer in (ppid, me)


def _stop_self(sig: int) -> None:
    """The executor stopped: stop ourselves the same way, so the shell sees a stopped job."""
    if sig not in STOPS:
        sig = _signal.SIGSTOP
    else:
        _signal.signal(sig, _signal.SIG_DFL)
    posix.kill(posix.getpid(), sig)
    if sig != _signal.SIGSTOP:
        _signal.signal(sig, _noop)


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


def _caller_ignored_signals() -> set[int]:
    """The forwardable signals the caller ignores: they stay ignored, and are not forwarded
    (the executor copies our ignored set, as a direct run would have inherited it).  Python
    itself ignores SIGPIPE and SIGXFSZ at start-up, so those two cannot tell, and are
    forwarded.  SIGINT and SIGPIPE get their default actions back meanwhile."""
    ignored = {s for s in FORWARDED_SIGNALS if _signal.getsignal(s) == _signal.SIG_IGN}
    ignored -= {_signal.SIGPIPE, _signal.SIGXFSZ}
    if _signal.SIGINT not in ignored:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_DFL)
    return ignored


def _fds_to_pass(offer: frozenset[bytes], passed: list[int]) -> list[int]:
    """The caller's other fds to pass, if the server takes them (``prefork-fds``)."""
    if protocol.FDS_TOKEN not in offer:
        return []
    if len(passed) > protocol.MAX_PASSED_FDS:
        raise ClientError(f"{len(passed)} open fds to pass on to the script: at most "
                          f"{protocol.MAX_PASSED_FDS} can be (close some, e.g. with "
                          "close_fds, or run the script directly)")
    return passed


def run(argv: list[str]) -> int:
    """Everything but the final propagation; returns the script's wait status."""
    # The fds above 2 the caller left open for us, before we open any: passed to the
    # script under x1 at their numbers, as a direct run inherits them.
    passed = fdio.inheritable_fds()
    closed = _fix_std_fds()
    ignored = _caller_ignored_signals()
    opts = parse_args(argv)
    if posix.environ.get(b"PREFORK_INTERP_DIRECT") and not opts.kill:
        # A direct run (the controlling terminal, /dev/tty prompts, job control).
        from prefork.client import direct

        direct.run_directly(_setup_argv(opts), closed)
    base = run_base()
    if opts.kill:
        from prefork.client import start

        start.kill_server(base, server_ident(opts, base))
        return 0
    wake_r = -1
    redirects = retries = 0
    resend = b""
    while redirects < 2:
        try:
            sock, offer = connect_or_spawn(opts, base)
        except ScriptEnded as e:
            return e.status
        if protocol.X1_TOKEN not in offer:
            send_request(sock, _request_argv(opts), False, closed)
            return read_status_v1(sock)
        if wake_r < 0:
            wake_r = forward_signals(ignored)
        try:
            try:
                send_request(sock, _request_argv(opts), True,
                             closed | protocol.FLAG_FOLLOWS_REDIRECT, _fds_to_pass(offer, passed))
            except (BrokenPipeError, ConnectionResetError):
                raise NotStarted(resend) from None  # the server had not all of it: no P
            return x1_call_loop(sock, wake_r, resend, protocol.RETRY_TOKEN in offer)
        except Redirected as r:
            sock.close()
            redirects += 1
            # The server of the caller's context (see prefork.server.context), started
            # here if there is none; if it cannot run the call either, the interpreter
            # runs directly.
            opts.ident = context_ident(base, server_ident(opts, base), r.code)
        except NotStarted as e:
            # The server ended the connection before it named an executor (killed, out of
            # fds, quitting): none of the script ran, so the call is sent again, to it or
            # to a fresh one.  A server that keeps doing so is bypassed: a direct run.
            sock.close()
            resend = e.signals
            retries += 1
            if retries > NOT_STARTED_RETRIES:
                break
    from prefork.client import direct

    direct.run_directly(_setup_argv(opts), closed)


def _os_error(e: OSError) -> str:
    """What failed, for a system call of ours that raised ``e``."""
    text = e.strerror or str(e)
    if e.filename is not None:
        text += f": {e.filename}"
    if e.errno == 24:  # EMFILE (no subclass for it; nothing more can be imported now)
        text += " (the fd limit, ulimit -n, is too low for a call)"
    return text


def main() -> None:
    """Entry point of ``prefork-interp``."""
    try:
        propagate(run(sys.argv))
    except (ClientError, RunDirError) as e:
        msg = f"prefork-interp: {e}\n"
    except (BrokenPipeError, ConnectionResetError) as e:
        msg = f"prefork-interp: the server went away during the call ({e.strerror})\n"
    except OSError as e:  # one of our own system calls, e.g. out of fds (ulimit -n 6)
        msg = f"prefork-interp: {_os_error(e)}\n"
    except KeyboardInterrupt:
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        posix.kill(posix.getpid(), _signal.SIGINT)
        msg = "prefork-interp: interrupted\n"
    try:
        posix.write(2, msg.encode("utf-8", "backslashreplace"))
    finally:
        posix._exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
