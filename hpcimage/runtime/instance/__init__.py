"""Instances: services in images, started in the background, listed, joined and stopped
by the user (`hpcimage instance ...`, `exec|run|shell instance://NAME`, the
image-instance wrapper). docs/instances.md.

    state     the per-user, per-host state files and their checks (standard library)
    start     `instance start|run`: the supervisor, the container, its PID 1
    join      `exec|run|shell instance://NAME`: setns into the instance, then the
              normal command path (standard library: reached from image-exec)
    manage    list, stop, stats, logs (psutil, lazily, for stats and the status)

Not the MPI per-node shared container (runtime/mpi/shared.py): other state
(/tmp/hpcimage-UID/JOB@NODE), other code, other lifetime.
"""
