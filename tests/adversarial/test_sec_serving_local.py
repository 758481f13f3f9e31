"""Security issue #18, finding 14: the local boundary of a node (its home, lock and control socket).

``node.lock`` was opened without O_NOFOLLOW and truncated (a symlinked lock truncated its target);
the home's owner and mode were not checked; neither end of the control socket checked who was at
the other end; the socket's permissions were set with a process-wide umask change. The tests that
need another user run only as root (they drop to ``nobody`` in a child process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import trio
from advkit import record

from swarm import client
from swarm.control import ControlServer, HomeLock

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody (the test venv may not be)
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to act as another user) and /usr/bin/python3",
)


@pytest.fixture
def shared_dir():
    """A directory under /tmp that another user can reach (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="swarm-sec-", dir="/tmp"))
    os.chmod(d, 0o711)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_symlinked_lock_is_not_followed(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    target = tmp_path / "authorized_keys"
    target.write_bytes(b"ssh-ed25519 AAAA... precious\n")
    (home / "node.lock").symlink_to(target)
    refused = None
    try:
        HomeLock(home).acquire().release()
    except OSError as e:
        refused = str(e)
    assert target.read_bytes() == b"ssh-ed25519 AAAA... precious\n", (
        "acquiring the lock truncated the target of a symlinked node.lock"
    )
    assert refused is not None and "symlink" in refused, refused
    # A hard link to someone's file is refused as well (it would be truncated the same way).
    (home / "node.lock").unlink()
    os.link(target, home / "node.lock")
    with pytest.raises(OSError, match="plain file"):
        HomeLock(home).acquire()
    assert target.read_bytes() == b"ssh-ed25519 AAAA... precious\n"


def test_unsafe_home_is_refused(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o777)
    with pytest.raises(OSError, match="writable by others"):
        HomeLock(home).acquire().release()
    os.chmod(home, 0o700)
    if os.geteuid() == 0:
        os.chown(home, NOBODY, NOBODY)
        with pytest.raises(OSError, match="belongs to uid"):
            HomeLock(home).acquire().release()
        os.chown(home, 0, 0)
    HomeLock(home).acquire().release()  # a home of our own, 0700: fine
    record(
        "local: node.lock symlink / unsafe home (#18 f14)",
        symlinked_lock="refused, target kept",
        world_writable_home="refused",
        foreign_home="refused",
    )


def test_bind_leaves_the_umask_alone(tmp_path, monkeypatch):
    """The control socket is created 0600 without changing the process-wide umask (other threads
    create files meanwhile)."""
    calls = []
    real = os.umask

    def watched(mask):
        calls.append(mask)
        return real(mask)

    monkeypatch.setattr(os, "umask", watched)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    server = ControlServer(home)
    sock = server._bind()
    try:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o600
        assert calls == [], f"_bind changed the process umask: {calls}"
        assert [p.name for p in home.iterdir()] == ["control.sock"]  # no staging dir left
    finally:
        sock.close()
        server._unlink()


_CLIENT_AS_NOBODY = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
out = b""
try:
    s.sendall(b"GET /v1/status HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n")
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
except (ConnectionResetError, BrokenPipeError):
    pass
print(out.split(b"\\r\\n", 1)[0].decode() or "closed unanswered")
"""


@needs_root
@pytest.mark.timeout(60)
async def test_server_refuses_another_users_connection(shared_dir):
    """Socket permissions opened by mistake (0666 in a traversable home): the server still refuses
    a client of another user by its peer credentials (closes the connection unanswered)."""
    server = ControlServer(shared_dir)
    async with trio.open_nursery() as n:
        await n.start(server.run)
        os.chmod(server.path, 0o666)
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                [SYSTEM_PYTHON, "-c", _CLIENT_AS_NOBODY, str(server.path)],
                user=NOBODY,
                capture_output=True,
                text=True,
                timeout=30,
            )
        )
        n.cancel_scope.cancel()
    status = proc.stdout.strip()
    assert proc.returncode == 0, proc.stderr
    assert status == "closed unanswered", f"another user's client was answered: {status!r}"
    record("local: control connection from another uid (#18 f14)", answer=status)


_SERVER_AS_NOBODY = """
import socket, sys, os
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(4)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    c.recv(65536)
    body = b'{"peer_id": "impostor"}'
    c.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: "
              + str(len(body)).encode() + b"\\r\\nconnection: close\\r\\n\\r\\n" + body)
    c.close()
"""


@needs_root
@pytest.mark.timeout(60)
def test_client_refuses_a_node_of_another_user(shared_dir):
    """Another user's process answering on the control socket path: the client refuses it, by the
    socket file's owner and (with the file handed to root) by the peer's credentials."""
    os.chmod(shared_dir, 0o1777)  # so that nobody can create the socket there
    sock = shared_dir / "control.sock"
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", _SERVER_AS_NOBODY, str(sock)], user=NOBODY, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        answers = {}
        for variant in ("socket owned by nobody", "socket chowned to root"):
            if variant == "socket chowned to root":
                os.chown(sock, 0, 0)
            try:
                answers[variant] = client.status(home=shared_dir)
            except client.NodeUnavailable as e:
                answers[variant] = f"refused: {e}"
        impostor = {k: v for k, v in answers.items() if not isinstance(v, str)}
        assert impostor == {}, f"the client talked to another user's process: {impostor}"
        assert "owner uid 65534" in answers["socket owned by nobody"]
        assert "runs as uid 65534" in answers["socket chowned to root"]
        record(
            "local: client to another uid's socket (#18 f14)",
            **{k.replace(" ", "_"): "refused" for k in answers},
        )
    finally:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
