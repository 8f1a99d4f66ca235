"""`hpcimage instance list|stop|stats|logs`: the user's instances on this host, read
from their state files (runtime/instance/state.py), their processes found with psutil
(those in the instance's PID namespace). Not on the hot path."""
import fnmatch
import os
import time

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.runtime.instance import state as st

SIGNAL_NAMES = ("HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "CONT", "STOP",
                "ALRM", "WINCH", "PWR", "XCPU")
DEFAULT_TIMEOUT = 10        # Apptainer's `instance stop -t`


def user_base(user=None):
    """(the state directory, uid) of user (a name; None: the caller)."""
    if user is None:
        return st.base_dir(), os.getuid()
    import pwd
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise UsageError(f"--user {user}: no such user") from None
    if os.getuid() not in (0, pw.pw_uid):
        raise UsageError("--user: only root lists another user's instances")
    return os.path.join(pw.pw_dir, ".hpcimage", "instances", st.host()), pw.pw_uid


def live(pattern=None, user=None):
    """[state dict] of the live instances whose name matches pattern (a glob); stale
    state files are removed (those of the caller's own)."""
    base, uid = user_base(user)
    out = []
    for name, data, files in st.all_states(base):
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        why = "not a state file" if data is None else st.check(data, files["lock"], uid)
        if why is not None:
            if not st.held(files["lock"]) and uid == os.getuid():
                st.remove(files["json"], files["lock"])
            continue
        data["_files"] = files
        out.append(data)
    return out


def processes(data):
    """psutil.Process objects of the instance: PID 1 and everything in its PID
    namespace."""
    import psutil
    init = int(data["init"])
    try:
        ns = os.stat(f"/proc/{init}/ns/pid").st_ino
    except OSError:
        return []
    out = []
    for p in psutil.process_iter():
        try:
            if os.stat(f"/proc/{p.pid}/ns/pid").st_ino == ns:
                out.append(p)
        except OSError:
            continue
    return out


def status(data):
    """running (processes besides PID 1) or idle (PID 1 alone: the startscript ended)."""
    return "running" if len(processes(data)) > 1 else "idle"


def list_text(insts, logs=False):
    rows = [("INSTANCE NAME", "PID", "STARTED", "STATUS", "IMAGE")]
    for d in insts:
        rows.append((d["name"], str(d["init"]), d.get("started_text", ""), status(d),
                     d["image"]))
    lines = table(rows)
    if logs:
        lines = [lines[0]] + [f"{ln}\n    stdout: {d['stdout']}\n    stderr: {d['stderr']}"
                              for ln, d in zip(lines[1:], insts)]
    return "\n".join(x.rstrip() for x in lines) + "\n"


def table(rows):
    """rows (tuples of str, the header first) as lines, each column padded to its widest
    cell, two spaces apart; the last column unpadded (`list` and `stats`)."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([c.ljust(n) for c, n in zip(r, w)] + [r[-1]]).rstrip() for r in rows]


def list_json(insts):
    """Apptainer's keys (instance, pid, img, ip, logOutPath, logErrPath) and ours."""
    import json
    out = [{"instance": d["name"], "pid": d["init"], "img": d["image"], "ip": "",
            "logOutPath": d["stdout"], "logErrPath": d["stderr"],
            "started": d.get("started"), "status": status(d),
            "supervisor": d["supervisor"], "job": d.get("job")} for d in insts]
    return json.dumps({"instances": out}, indent=4) + "\n"


def parse_signal(sig):
    """-s SIGNAL: a name (TERM, SIGTERM) or a number."""
    import signal as _signal
    s = sig.strip().upper()
    if s.isdigit() and 0 < int(s) < _signal.NSIG:
        return int(s)
    s = s[3:] if s.startswith("SIG") else s
    if s in SIGNAL_NAMES:
        return int(getattr(_signal, "SIG" + s))
    raise UsageError(f"-s {sig}: not a signal (a name such as TERM or a number)")


def stop(names, force=False, sig=None, timeout=DEFAULT_TIMEOUT, all_=False, out=None):
    """Stop the instances NAME (a name or a glob) or all of them: the signal (SIGTERM;
    -F: SIGKILL) to PID 1, SIGKILL when it is still there after timeout seconds.
    Returns the names stopped."""
    import signal as _signal
    if timeout < 0:
        raise UsageError(f"-t {timeout}: a timeout is a number of seconds >= 0")
    signum = _signal.SIGKILL if force else (parse_signal(sig) if sig else _signal.SIGTERM)
    if all_:
        targets = live()
    else:
        if not names:
            raise UsageError("no instance name given (usage: hpcimage instance stop "
                             "[-F] [-s SIGNAL] [-t TIMEOUT] [--all] NAME|PATTERN)")
        targets = []
        for n in names:
            if any(c in n for c in "*?["):
                targets += live(n)
            else:
                targets.append(st.find(n))
        if not targets:
            raise HpcimageError(f"no instance matches {' '.join(names)!r}")
    for d in targets:
        try:
            os.kill(int(d["init"]), signum)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    left = list(targets)
    while left:
        left = [d for d in left if _running(d)]
        if not left:
            break
        if time.monotonic() >= deadline:
            for d in left:
                if signum != _signal.SIGKILL and out is not None:
                    out.write(f"instance {d['name']}: still running after {timeout}s, "
                              "killing it\n")
                try:
                    os.kill(int(d["init"]), _signal.SIGKILL)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            signum = _signal.SIGKILL
            if not [d for d in left if _running(d)]:
                break
            timeout = 10
        time.sleep(0.02)
    return [d["name"] for d in targets]


def _running(d):
    """The supervisor is still there (it removes the state when the instance ends)."""
    s = st.proc_stat(int(d["supervisor"]))
    return s is not None and s[2] not in "ZX" and s[1] == d["supervisor_start"]


def stats(name, as_json=False):
    """CPU and memory of the instance's processes (psutil)."""
    import psutil
    d = st.find(name)
    procs = processes(d)
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.2)
    rows = []
    for p in procs:
        try:
            with p.oneshot():
                rows.append({"pid": p.pid, "name": p.name(), "cpu_percent": p.cpu_percent(None),
                             "rss": p.memory_info().rss, "cpu_times": sum(p.cpu_times()[:2])})
        except psutil.Error:
            continue
    total = {"instance": name, "pid": d["init"], "processes": len(rows),
             "cpu_percent": round(sum(r["cpu_percent"] for r in rows), 1),
             "cpu_seconds": round(sum(r["cpu_times"] for r in rows), 2),
             "memory_rss": sum(r["rss"] for r in rows),
             "memory_total": psutil.virtual_memory().total}
    if as_json:
        import json
        return json.dumps(dict(total, detail=rows), indent=4) + "\n"
    mib = total["memory_rss"] / 2**20
    pct = 100.0 * total["memory_rss"] / total["memory_total"]
    rows = [("INSTANCE NAME", "PID", "PROCESSES", "CPU %", "CPU TIME", "MEM USAGE", "MEM %"),
            (name, str(d["init"]), str(total["processes"]), f"{total['cpu_percent']:.1f}",
             f"{total['cpu_seconds']:.2f}s", f"{mib:.1f}MiB", f"{pct:.2f}")]
    return "\n".join(table(rows)) + "\n"


def logs(name):
    d = st.find(name)
    return f"stdout: {d['stdout']}\nstderr: {d['stderr']}\n"
