"""What an MPI job's environment says: whether this process is a rank, the job's key
(one shared container per job and node), the variables a rank needs. Standard library
only (hpcimage-join, join.c, re-derives is_rank and job_key: keep them in step)."""


# Reach the rank even under --cleanenv.
FORWARD_PREFIXES = ("PMIX_", "PMI_", "SLURM_", "OMPI_", "MPICH_", "UCX_", "FI_", "PRTE_",
                    "HYDRA_", "HYDI_", "I_MPI_", "MPI_", "OMPI_MCA_", "PSM2_", "NCCL_")


RANK_MARKERS = ("PMIX_RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMI_FD")


PMIX_TRANSLATE = {"PMIX_PTL_MODULE": "PMIX_MCA_ptl", "PMIX_SECURITY_MODE": "PMIX_MCA_psec",
                  "PMIX_GDS_MODULE": "PMIX_MCA_gds"}


PMIX_DIR_VARS = ("PMIX_SERVER_TMPDIR", "PMIX_SYSTEM_TMPDIR", "PMIX_SERVER_URI_DIR",
                 "SLURM_PMIX_TMPDIR", "TMPDIR")


NO_CMA = {"OMPI_MCA_btl_vader_single_copy_mechanism": "none",
          "OMPI_MCA_smsc": "^cma", "UCX_TLS_CMA": "n", "MPIR_CVAR_CH4_SHM_POSIX_IPC": "none"}


def is_rank(environ):
    if any(environ.get(k) for k in RANK_MARKERS):
        return True
    step = environ.get("SLURM_STEP_ID") or environ.get("SLURM_STEPID")
    return bool(step) and step.isdigit() and int(step) < 0xFFFFFFF0


def job_key(environ):
    """One name for the ranks of one job step on this node, or None. HPCIMAGE_MPI_KEY
    (set by an image-mpi launcher that prepared the container itself) comes first."""
    for parts in (("HPCIMAGE_MPI_KEY",), ("SLURM_JOB_ID", "SLURM_STEP_ID"), ("PMIX_NAMESPACE",),
                  ("OMPI_MCA_ess_base_jobid",), ("OMPI_MCA_orte_ess_jobid",),
                  ("PMI_KVSNAME",), ("PMI_ID_SPACE",)):
        vals = [environ.get(p) for p in parts]
        if all(vals):
            key = "-".join(vals)
            return "".join(c if c.isalnum() or c in "._-" else "_" for c in key)[:120]
    return None
