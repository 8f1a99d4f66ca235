"""Copying an image while hashing it, with a progress bar on a terminal."""
import hashlib
import os
import shutil
import sys
import time

from hpcimage.errors import HpcimageError
from hpcimage.store.layout import isatty


CHUNK = 8 << 20                    # copy buffer


PROGRESS_MIN = 4 << 20             # no progress bar below this size


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


class Progress:
    """A one-line progress bar on a terminal; silent elsewhere or for small copies.

    Each redraw is `\r`, the line, then "clear to the end of the line" (ESC [K); the
    line fits the terminal's width at that moment (TIOCGWINSZ: a resized window is
    followed), dropping the rate, then the sizes, then shortening the bar and the
    label, so that it never wraps into a stale second line."""

    WIDTH = 30          # the bar's width where there is room
    MIN_BAR = 10

    def __init__(self, label, total, stream=None, force=None):
        self.stream = stream or sys.stderr
        show = isatty(self.stream) if force is None else force
        self.on = show and total >= PROGRESS_MIN
        self.label = label
        self.total = max(total, 1)
        self.start = time.monotonic()
        self.last = 0.0

    def columns(self):
        try:
            return os.get_terminal_size(self.stream.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):
            return shutil.get_terminal_size().columns

    def line(self, done, rate, columns):
        """The text of the bar for `done` bytes at `rate` bytes/s, at most columns - 1
        characters (the last column would make some terminals wrap)."""
        room = max(columns - 1, 1)
        frac = min(done / self.total, 1.0)
        pct = f" {frac * 100:3.0f}%"
        tails = (f"{pct} {mib(done)} of {mib(self.total)} {rate / (1 << 20):.0f} MiB/s",
                 f"{pct} {mib(done)} of {mib(self.total)}", pct)
        label = self.label
        for tail in tails:
            bar = min(room - len(label) - 3 - len(tail), self.WIDTH)
            if bar >= self.MIN_BAR:
                break
        else:
            bar = self.MIN_BAR
            label = label[:max(room - 3 - bar - len(tail), 0)]
        fill = int(frac * bar)
        return f"{label} [{'#' * fill}{'.' * (bar - fill)}]{tail}"[:room]

    def update(self, done, final=False):
        if not self.on:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-6)
        self.stream.write("\r" + self.line(done, rate, self.columns()) + "\x1b[K")
        self.stream.flush()

    def close(self, done=None):
        """Finish the line (the bar at `done`, or as it stands after a failure)."""
        if self.on:
            if done is not None:
                self.update(done, final=True)
            self.stream.write("\n")
            self.stream.flush()
            self.on = False


def _write_all(fd, view):
    while view:
        n = os.write(fd, view)
        view = view[n:]


def copy_hashing(src, dst, size, progress=None, chunk=CHUNK):
    """Copy `size` bytes from fd `src` to fd `dst` in one pass, hashing what is
    written -> sha256 hex digest. A writer thread writes one buffer while the next is
    read and hashed (hashlib and os.write release the GIL). Raises OSError; raises
    HpcimageError when the source ends early or grows."""
    h = hashlib.sha256()
    try:
        os.posix_fadvise(src, 0, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass
    done = 0
    if size <= 2 * chunk:
        buf = bytearray(min(chunk, max(size, 1) + 1))
        view = memoryview(buf)
        while True:
            n = os.readv(src, [buf])
            if not n:
                break
            h.update(view[:n])
            _write_all(dst, view[:n])
            done += n
            if progress:
                progress.update(done)
    else:
        import queue
        import threading
        free = queue.Queue()
        for _ in range(3):
            free.put(bytearray(chunk))
        work = queue.Queue()
        failed = []

        def writer():
            while True:
                item = work.get()
                if item is None:
                    return
                b, n = item
                if not failed:
                    try:
                        _write_all(dst, memoryview(b)[:n])
                    except BaseException as e:   # noqa: B902 -- handed to the reader
                        failed.append(e)
                free.put(b)

        t = threading.Thread(target=writer, name="hpcimage-copy-writer", daemon=True)
        t.start()
        try:
            while not failed:
                b = free.get()
                n = os.readv(src, [b])
                if not n:
                    free.put(b)
                    break
                h.update(memoryview(b)[:n])
                work.put((b, n))
                done += n
                if progress:
                    progress.update(done)
        finally:
            work.put(None)
            t.join()
        if failed:
            raise failed[0]
    if done != size:
        raise HpcimageError(f"the source changed while it was copied ({done} bytes read, "
                            f"{size} expected)")
    return h.hexdigest()


def hash_file(path):
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()
