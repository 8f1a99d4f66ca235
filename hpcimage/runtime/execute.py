"""execute(plan): the one loop that carries out a Plan's operations (runtime.ops) in
order, each by its run(state). Standard library only: the hot path."""
import os

from hpcimage.errors import HpcimageError
from hpcimage.runtime.ops import Session, State, pin_sources


def execute(p):
    """Carry out plan p. Does not return when the command was exec'd; returns the
    squashfuse daemon's pid (or None) when p holds no exec step."""
    state = State()
    trace = os.environ.get("HPCIMAGE_TRACE") == "1"
    if trace:
        import time
        t = time.perf_counter()
    ops = list(p.ops)
    for i in range(len(ops)):
        op = ops[i]
        if trace:
            now = time.perf_counter()
            os.write(2, f"hpcimage: trace: {(now - t) * 1000:7.2f} ms before {op.name}\n".encode())
            t = now
        try:
            if type(op) is Session:
                # The pinning pass, here: in the launch's mount namespace (mount(2)
                # refuses an fd of another one), before the session tmpfs hides them.
                ops[i:] = pin_sources(ops[i:])
            op.run(state)
        except HpcimageError:
            raise
        except OSError as e:
            for pid in state.data_pids + [state.mount_pid]:
                if pid:
                    _kill(pid)
            raise HpcimageError(_oserror(op.name, e)) from None
    return state.mount_pid


def _kill(pid):
    import _signal as signal
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except OSError:
        pass


def _oserror(step, e):
    msg = f"launch step '{step}' failed: {e.strerror or e}"
    if e.filename:
        msg += f": {e.filename}"
    if step == "userns" and e.errno in (1, 22, 28):
        msg += " (are unprivileged user namespaces enabled? see user.max_user_namespaces)"
    return msg
