#!/usr/bin/python3
"""`rsh` between the nodes of scripts/slurm-nodes.sh (no ssh on a test machine).

    nodes-rsh.py HOST COMMAND...     run COMMAND (one shell line) on node HOST as the
                                     caller; stdin, stdout and stderr are the caller's
                                     own; the exit status is COMMAND's (128+N: signal N)
    nodes-rsh.py --serve SOCKET      (root, started inside a node's namespaces by
                                     slurm-nodes.sh) the node's side

The client connects to $HPCIMAGE_NODES_DIR/HOST.sock (a path: every network namespace
reaches it) and sends its descriptors 0-2 (SCM_RIGHTS) with a JSON request {argv, cwd,
env}; the server takes the caller's uid and gid from the socket (SO_PEERCRED, which the
caller cannot forge), forks, drops to that user (its groups from the group database),
runs `/bin/sh -c LINE` in the node's namespaces, and answers the status as 4 bytes.
What `mpirun --mca plm_rsh_agent nodes-rsh.py` needs, and no more.
"""
import array
import json
import os
import pwd
import signal
import socket
import struct
import sys

STATE = os.environ.get("HPCIMAGE_NODES_DIR", "/var/tmp/hpcimage-nodes")
MAX_REQUEST = 1 << 20


def serve(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    os.chmod(path, 0o666)
    srv.listen(128)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    while True:
        try:
            conn, _ = srv.accept()
        except InterruptedError:
            continue
        if os.fork() == 0:
            srv.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                code = _handle(conn)
            except Exception as e:          # the client sees status 255 and this line
                print(f"nodes-rsh: {e}", file=sys.stderr)
                code = 255
            try:
                conn.sendall(struct.pack("i", code))
            except OSError:
                pass
            os._exit(0)
        conn.close()


def _reap():
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _handle(conn):
    _pid, uid, gid = struct.unpack("3i", conn.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    fds = array.array("i")
    data, anc, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, blob in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(blob[:len(blob) - len(blob) % fds.itemsize])
    if len(fds) != 3:
        raise ValueError("a request carries exactly 3 descriptors")
    req = json.loads(data)
    child = os.fork()
    if child == 0:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        user = pwd.getpwuid(uid)
        os.setgroups(os.getgrouplist(user.pw_name, gid))
        os.setgid(gid)
        os.setuid(uid)
        try:
            os.chdir(req["cwd"])
        except OSError:
            os.chdir(user.pw_dir if os.path.isdir(user.pw_dir) else "/")
        os.execve("/bin/sh", ["/bin/sh", "-c", " ".join(req["argv"])], req["env"])
    for fd in fds:
        os.close(fd)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)


def client(host, argv):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(STATE, f"{host}.sock"))
    except OSError as e:
        sys.exit(f"nodes-rsh: {host}: no such node ({e.strerror})")
    req = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
    answer = b""
    while len(answer) < 4:
        part = sock.recv(4 - len(answer))
        if not part:
            break
        answer += part
    code = struct.unpack("i", answer)[0] if len(answer) == 4 else 255
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    elif len(sys.argv) >= 3 and not sys.argv[1].startswith("-"):
        client(sys.argv[1], sys.argv[2:])
    else:
        sys.exit(__doc__.split("\n\n")[1])
