"""Descriptor games on watched sockets, for tests/deploy_fds.rs. One process holds:
  - client connections to SIM (the upstream port, `observer sim`: its server end counts),
  - its own listener on LISTEN (a second upstream port) and both ends of connections to it
    (the accepted end counts: reads are requests, writes responses),
and then reuses their descriptor numbers for connections to ECHO (an unwatched echo server) that
carry HTTP-looking bytes ("phantoms": a request and a response, echoed back). None of those may
be counted, or read as a parse error, on a watched connection.

Modes (what is done; then `ready` is printed and the process waits for stdin to close):
  dup2        an exchange with SIM on W and one on the accepted end S; dup2(echo, W) (the dup2
              syscall) and dup3(echo, S, O_CLOEXEC) (Python's dup2 with inheritable=False):
              both watched sockets are really closed; phantoms on W's and S's numbers.
  close_range three exchanges with SIM (W1, W2, W3) and two accepted ends (S1, S2), each one
              exchange; the close_range syscall over W1..=W2 and over S1..=S2 (glibc's
              wrapper: Python's os.closerange may fall back to close); echo connections take
              those numbers and carry phantoms; one more exchange on W3.
  exec        an exchange with SIM on W and one on S (both close-on-exec, as Python makes every
              descriptor), then exec of this script again (mode after_exec, same process) that
              opens echo connections until it holds W's, S's and C's numbers again and sends
              phantoms on them.
  dup         an exchange with SIM sent on a copy of W (the dup syscall) and read on W; an
              exchange on the accepted end S served on its copy S2; S closed (S2 keeps the
              connection open): prints `checkpoint dup` and waits for a line; then one more
              exchange on S2, a phantom on an echo connection that took S's number, and S2
              closed.
  dupfd       the same with copies made by fcntl(F_DUPFD_CLOEXEC) (Python's os.dup).

Exchanges: `GET /api/version` to SIM, `GET /helper` to LISTEN (answered 200 by this process);
each answered 200. The watched descriptors are numbered above 32 (low numbers are taken by
/dev/null first), out of reach of what a new Python opens and closes while it starts.

Usage: fd_games.py MODE SIM_HOST:PORT LISTEN_HOST:PORT ECHO_HOST:PORT
"""

import ctypes
import os
import socket
import sys

MODE = sys.argv[1]


def split(addr):
    host, port = addr.rsplit(":", 1)
    return host, int(port)


SIM, LISTEN, ECHO = split(sys.argv[2]), split(sys.argv[3]), split(sys.argv[4])

TO_SIM = b"GET /api/version HTTP/1.1\r\nHost: sim\r\n\r\n"
TO_HELPER = b"GET /helper HTTP/1.1\r\nHost: helper\r\n\r\n"
HELPER_BODY = b'{"version":"0.0.0"}'
HELPER_REPLY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(HELPER_BODY)).encode()
    + b"\r\n\r\n"
    + HELPER_BODY
)
PHANTOM_REQUEST = b"POST /api/chat HTTP/1.1\r\nHost: phantom\r\nContent-Length: 2\r\n\r\n{}"
PHANTOM_RESPONSE = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}"


def connect(addr):
    """A connected socket's bare descriptor: Python will never close it behind our back."""
    return socket.create_connection(addr).detach()


def read_exactly(fd, n):
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise SystemExit(f"fd {fd}: closed after {data!r}")
        data += chunk
    return data


def read_head(fd):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = os.read(fd, 65536)
        if not chunk:
            raise SystemExit(f"fd {fd}: closed after {data!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    return head, rest


def read_response(fd):
    """Reads one Content-Length response; its status."""
    head, rest = read_head(fd)
    lines = head.split(b"\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if len(rest) < length:
        rest += read_exactly(fd, length - len(rest))
    return int(lines[0].split()[1])


def with_sim(fd, send_fd=None):
    os.write(send_fd if send_fd is not None else fd, TO_SIM)
    status = read_response(fd)
    assert status == 200, status


LISTENER = []


def listener():
    """Our own listener on LISTEN, made on first use."""
    if not LISTENER:
        LISTENER.append(socket.create_server(LISTEN))
    return LISTENER[0]


def pair():
    """A connection to our own listener: (client end, accepted end)."""
    server = listener()
    client = connect(LISTEN)
    accepted, _ = server.accept()
    return client, accepted.detach()


def served(client, server):
    """One exchange on our own connection, served on the descriptor `server`."""
    os.write(client, TO_HELPER)
    head, _ = read_head(server)
    assert head.startswith(b"GET /helper"), head
    os.write(server, HELPER_REPLY)
    assert read_response(client) == 200


def phantom(fd):
    """HTTP-looking bytes through an unwatched echo connection on descriptor `fd`."""
    for message in (PHANTOM_REQUEST, PHANTOM_RESPONSE):
        os.write(fd, message)
        assert read_exactly(fd, len(message)) == message


LIBC = ctypes.CDLL(None, use_errno=True)


def close_range(first, last):
    """The close_range syscall (glibc's wrapper), closing `first`..=`last`."""
    if LIBC.close_range(first, last, 0) != 0:
        raise OSError(ctypes.get_errno(), "close_range")


def duplicate(fd):
    """A copy of `fd`: by the dup syscall (mode dup) or fcntl F_DUPFD_CLOEXEC (mode dupfd,
    what Python's os.dup does)."""
    if MODE == "dup":
        copy = LIBC.dup(fd)
        if copy < 0:
            raise OSError(ctypes.get_errno(), "dup")
        return copy
    return os.dup(fd)


def take(numbers):
    """Opens echo connections until every descriptor number in `numbers` is one of them."""
    held = []
    while not set(numbers) <= set(held):
        held.append(connect(ECHO))
        assert len(held) < 256, (numbers, held)
    return held


def done():
    print("ready", flush=True)
    sys.stdin.read()


# Descriptors 3..34 on /dev/null: the sockets get numbers above them.
FILLER = [os.open("/dev/null", os.O_RDONLY) for _ in range(32)]

if MODE == "dup2":
    w = connect(SIM)
    with_sim(w)
    c, s = pair()
    served(c, s)
    u = connect(ECHO)
    os.dup2(u, w)  # inheritable: the dup2 syscall
    os.close(u)
    phantom(w)
    u = connect(ECHO)
    os.dup2(u, s, inheritable=False)  # dup3(u, s, O_CLOEXEC)
    os.close(u)
    phantom(s)
    done()
elif MODE == "close_range":
    w1, w2, w3 = connect(SIM), connect(SIM), connect(SIM)
    assert (w2, w3) == (w1 + 1, w1 + 2), (w1, w2, w3)
    for w in (w1, w2, w3):
        with_sim(w)
    server = listener()
    c1, c2 = connect(LISTEN), connect(LISTEN)
    s1, s2 = server.accept()[0].detach(), server.accept()[0].detach()
    assert s2 == s1 + 1, (s1, s2)
    served(c1, s1)
    served(c2, s2)
    close_range(w1, w2)
    close_range(s1, s2)
    for fd in take([w1, w2, s1, s2]):
        if fd in (w1, w2, s1, s2):
            phantom(fd)
    with_sim(w3)
    done()
elif MODE == "exec":
    w = connect(SIM)
    with_sim(w)
    c, s = pair()
    served(c, s)
    for fd in (w, c, s, listener().fileno()):
        assert not os.get_inheritable(fd), fd
    numbers = ",".join(str(fd) for fd in (w, s, c))
    os.execv(sys.executable, [sys.executable, __file__, "after_exec", *sys.argv[2:], numbers])
elif MODE == "after_exec":
    # The new program: W, S, C and the listener were closed by the exec.
    numbers = [int(fd) for fd in sys.argv[5].split(",")]
    for fd in take(numbers):
        if fd in numbers:
            phantom(fd)
    done()
elif MODE in ("dup", "dupfd"):
    w = connect(SIM)
    w_copy = duplicate(w)
    with_sim(w, send_fd=w_copy)
    c, s = pair()
    s_copy = duplicate(s)
    served(c, s_copy)
    os.close(s)
    print("checkpoint dup", flush=True)
    sys.stdin.readline()
    served(c, s_copy)
    u = connect(ECHO)
    assert u == s, (u, s)
    phantom(u)
    os.close(s_copy)
    done()
else:
    raise SystemExit(f"unknown mode {MODE}")

