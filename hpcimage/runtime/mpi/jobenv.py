"""What an MPI job's environment says: whether this process is a rank, the job's key
(one shared container per job and node), the variables a rank needs. Standard library
only, and no imports: setup.py reads the tables below (RANK_MARKERS ... KEY_MAX) into
the header hpcimage-join (join.c) is compiled with, so the joiner applies the same rules."""


# Reach the rank even under --cleanenv.
FORWARD_PREFIXES = ("PMIX_", "PMI_", "SLURM_", "OMPI_", "MPICH_", "UCX_", "FI_", "PRTE_",
                    "HYDRA_", "HYDI_", "I_MPI_", "MPI_", "OMPI_MCA_", "PSM2_", "NCCL_")


# The rank test: one of RANK_MARKERS set, or a Slurm step (the first set of STEP_VARS)
# below STEP_LIMIT (Slurm's batch and extern steps are 0xFFFFFFFx).
RANK_MARKERS = ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_FD")
STEP_VARS = ("SLURM_STEP_ID", "SLURM_STEPID")
STEP_LIMIT = 0xFFFFFFF0

# The job key: the first group whose variables are all set, their values joined with
# "-", other characters than KEY_CHARS and letters/digits made "_", at most KEY_MAX.
# HPCIMAGE_MPI_KEY: set by an image-mpi launcher that prepared the container itself.
KEY_GROUPS = (("HPCIMAGE_MPI_KEY",), ("SLURM_JOB_ID", "SLURM_STEP_ID"), ("PMIX_NAMESPACE",),
              ("OMPI_MCA_ess_base_jobid",), ("OMPI_MCA_orte_ess_jobid",),
              ("PMI_KVSNAME",), ("PMI_ID_SPACE",))
KEY_CHARS = "._-"
KEY_MAX = 120


PMIX_TRANSLATE = {"PMIX_PTL_MODULE": "PMIX_MCA_ptl", "PMIX_SECURITY_MODE": "PMIX_MCA_psec",
                  "PMIX_GDS_MODULE": "PMIX_MCA_gds"}


# The job's own directories that the PMIx/PMI server and Open MPI's ranks talk through,
# bound at their paths into a rank's container: PMIx's server directory (srun's
# pmix.JOB.STEP, mpirun's session pid.PID: the data store is there), Open MPI's job
# session directory. Not TMPDIR or PMIX_SYSTEM_TMPDIR: they name the system's /tmp,
# which --contain replaces with a fresh one (the clients connect by the URI variables).
PMIX_DIR_VARS = ("PMIX_SERVER_TMPDIR", "PMIX_SERVER_URI_DIR", "SLURM_PMIX_TMPDIR",
                 "OMPI_MCA_orte_jobfam_session_dir", "PRTE_MCA_prte_jobfam_session_dir")


# What a rank in a user namespace of its own needs (steps.mpi_rank_alone): no CMA
# (process_vm_readv) between ranks; UCX's posix segments by name, not /proc/PID/fd.
NO_CMA = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none",
          "OMPI_MCA_smsc": "^cma", "UCX_TLS_CMA": "n", "MPIR_CVAR_CH4_SHM_POSIX_IPC": "none",
          "UCX_POSIX_USE_PROC_LINK": "n"}


def is_rank(environ):
    if any(environ.get(k) for k in RANK_MARKERS):
        return True
    step = None
    for k in STEP_VARS:
        step = step or environ.get(k)
    return bool(step) and step.isdigit() and int(step) < STEP_LIMIT


def job_key(environ):
    """One name for the ranks of one job step on this node, or None."""
    for parts in KEY_GROUPS:
        vals = [environ.get(p) for p in parts]
        if all(vals):
            key = "-".join(vals)
            return "".join(c if c.isalnum() or c in KEY_CHARS else "_" for c in key)[:KEY_MAX]
    return None


def local_tasks(environ):
    """How many ranks of this job step run on this node, as the launcher says, or 0
    when it does not say: Slurm's SLURM_STEP_TASKS_PER_NODE ("2(x3),1", one entry per
    node of the step) at SLURM_NODEID, Open MPI's OMPI_COMM_WORLD_LOCAL_SIZE, MPICH
    Hydra's MPI_LOCALNRANKS. The node's holder waits for that many joins (GRACE)."""
    for name in ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        v = environ.get(name, "")
        if v.isdigit():
            return int(v)
    spec, node = environ.get("SLURM_STEP_TASKS_PER_NODE", ""), environ.get("SLURM_NODEID", "")
    if not spec or not node.isdigit():
        return 0
    counts = []
    for part in spec.split(","):
        n, _x, rep = part.partition("(x")
        if not n.isdigit() or (rep and not rep[:-1].isdigit()) or (rep and rep[-1:] != ")"):
            return 0
        counts += [int(n)] * (int(rep[:-1]) if rep else 1)
    i = int(node)
    return counts[i] if i < len(counts) else 0


# How long (seconds) a node's holder waits for the ranks local_tasks() still expects
# after the ranks so far have all exited (very short ranks started late: srun -n 64
# image-mpi true on a busy node); measured from the last join.
GRACE = 5.0

