"""Run by every rank of a multi-node image-mpi job (tests/test_multinode.py): an
allreduce, a ring, a 4 MiB exchange with the rank on the other side of the world, and
where this rank runs (its node, its user and mount namespaces). One line per rank:
    rank R size S sum X ring OK big OK host H userns U mntns M"""
import os
import socket

from mpi4py import MPI

c = MPI.COMM_WORLD
rank, size = c.rank, c.size
total = c.allreduce(rank + 1)
right, left = (rank + 1) % size, (rank - 1) % size
got = c.sendrecv(rank, dest=right, source=left)
ring = "OK" if got == left else f"BAD({got})"
peer = (rank + size // 2) % size
big = bytes([rank % 251]) * (4 << 20)
back = c.sendrecv(big, dest=peer, source=peer)
bigok = "OK" if back == bytes([peer % 251]) * (4 << 20) else "BAD"
c.Barrier()
print(f"rank {rank} size {size} sum {total} ring {ring} big {bigok} "
      f"host {socket.gethostname()} userns {os.readlink('/proc/self/ns/user')} "
      f"mntns {os.readlink('/proc/self/ns/mnt')}", flush=True)
