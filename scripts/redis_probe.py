#!/usr/bin/env python3
"""What answers on a Redis address: used by scripts/redis.sh before it starts the embedded server.

Standard library only (raw RESP over a socket), so it runs with the system python3 before the
project's virtualenv exists and answers in milliseconds instead of after a 40 s start-up poll.

    redis_probe.py HOST PORT                 exit 0: a Redis with the search module answers
                                             exit 3: nothing listens (connection refused)
                                             exit 1: something else; stdout says what, in one phrase
    redis_probe.py --url URL                 the same for a redis:// URL (AUTH with its user:password
                                             or EMBED_WORKER__REDIS__USERNAME/PASSWORD); rediss:// exits 4
    redis_probe.py HOST PORT --wait S --pid PID [--log FILE]
                                             waits up to S seconds for exit 0 while PID lives; if PID
                                             dies, exit 1 with the log's last error line
    redis_probe.py --free-near PORT          prints the first free port from PORT on (for a Fix: hint)
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.parse

TIMEOUT = 1.0
FREE, SEARCH, OTHER, TLS = 3, 0, 1, 4


class NotRedis(Exception):
    """The peer does not speak RESP."""


class Reply(Exception):
    """A RESP error reply (-ERR ..., -NOAUTH ...)."""


def encode(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for a in args:
        b = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def read_reply(f):
    """One RESP2/RESP3 value from a buffered socket file; errors raise Reply."""
    line = f.readline()
    if not line:
        raise NotRedis("it closed the connection without answering")
    if not line.endswith(b"\r\n") or line[:1] not in b"+-:$*%~_,#>=(!|":
        raise NotRedis(f"it answered {line[:40].decode('ascii', errors='replace').strip()!r}")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode(errors="replace")
    if kind == b"-":
        raise Reply(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind in b"$=!":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind in b"*~>":
        n = int(rest)
        return None if n < 0 else [read_reply(f) for _ in range(n)]
    if kind == b"%" or kind == b"|":
        items = [read_reply(f) for _ in range(2 * int(rest))]
        return dict(zip(items[::2], items[1::2]))
    return rest.decode(errors="replace")


def module_names(reply) -> list[str]:
    names = []
    for m in reply or []:
        if isinstance(m, dict):
            names.append(str(m.get("name")))
        elif isinstance(m, list) and len(m) >= 2:
            names.append(str(dict(zip(m[::2], m[1::2])).get("name")))
    return names


def probe(host: str, port: int, username: str = "", password: str = "") -> tuple[int, str]:
    """(code, phrase): what listens on host:port; for OTHER in words fit for 'port N is taken by ...'."""
    addr = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    except ConnectionRefusedError:
        return FREE, f"nothing listens on {addr}"
    except OSError as e:
        return OTHER, f"an address that cannot be reached ({e.strerror or e})"
    with sock:
        f = sock.makefile("rb")
        try:
            if password:
                sock.sendall(encode("AUTH", username, password) if username else encode("AUTH", password))
                read_reply(f)
            sock.sendall(encode("PING"))
            read_reply(f)
            sock.sendall(encode("INFO", "server"))
            info = read_reply(f) or ""
            version = next((l.split(":", 1)[1].strip() for l in info.splitlines()
                            if l.startswith("redis_version:")), "")
            sock.sendall(encode("MODULE", "LIST"))
            names = module_names(read_reply(f))
        except socket.timeout:
            return OTHER, f"something that is not Redis (it accepted a connection but did not answer PING within {TIMEOUT:.0f}s)"
        except NotRedis as e:
            return OTHER, f"something that is not Redis ({e})"
        except Reply as e:
            msg = str(e)
            if msg.startswith(("NOAUTH", "WRONGPASS")):
                return OTHER, f"a Redis that needs a password ({msg.split('.')[0]}), so its modules cannot be checked"
            if msg.startswith("LOADING"):
                return OTHER, f"a Redis still loading its data"
            return OTHER, f"a Redis-like server that refused a command ({msg})"
        except OSError as e:
            return OTHER, f"something that is not Redis (the connection failed: {e.strerror or e})"
    if "search" in names:
        return SEARCH, f"a Redis {version} with the search module on {addr}"
    mods = ", ".join(names) if names else "none"
    return OTHER, f"a Redis {version} without the search module (modules loaded: {mods})"


def last_error_line(log: str) -> str:
    try:
        lines = [l.strip() for l in open(log, errors="replace") if l.strip()]
    except OSError:
        return "no log"
    for l in reversed(lines):
        if "#" in l or "rror" in l or "ailed" in l:
            return l
    return lines[-1] if lines else "empty log"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) still answers kill 0.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def main(argv: list[str]) -> int:
    if argv[:1] == ["--free-near"]:
        port = int(argv[1])
        while port < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    print(port)
                    return 0
                except OSError:
                    port += 1
        return 1
    if argv[:1] == ["--url"]:
        u = urllib.parse.urlsplit(argv[1])
        if u.scheme == "rediss":
            print(f"{u.hostname}:{u.port or 6379} over TLS (not probed)")
            return TLS
        if u.scheme not in ("redis", ""):
            print(f"{argv[1]!r} is not a redis:// URL")
            return OTHER
        username = os.environ.get("EMBED_WORKER__REDIS__USERNAME") or urllib.parse.unquote(u.username or "")
        password = os.environ.get("EMBED_WORKER__REDIS__PASSWORD") or urllib.parse.unquote(u.password or "")
        code, phrase = probe(u.hostname or "127.0.0.1", u.port or 6379, username, password)
        print(phrase)
        return code
    host, port, rest = argv[0], int(argv[1]), argv[2:]
    opts = dict(zip(rest[::2], rest[1::2]))
    if "--wait" not in opts:
        code, phrase = probe(host, port)
        print(phrase)
        return code
    deadline = time.monotonic() + float(opts["--wait"])
    pid = int(opts["--pid"])
    while True:
        code, phrase = probe(host, port)
        if code == SEARCH:
            print(phrase)
            return SEARCH
        if not alive(pid):
            print(f"redis-server exited at start-up: {last_error_line(opts.get('--log', ''))}")
            return OTHER
        if time.monotonic() > deadline:
            print(f"redis-server (pid {pid}) did not answer with the search module within {opts['--wait']}s: {phrase}")
            return OTHER
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
