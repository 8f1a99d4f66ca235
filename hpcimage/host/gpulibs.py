"""What --nv, --rocm and --ib look for on the host, as data.

The GPU lists follow Apptainer's etc/nvliblist.conf and etc/rocmliblist.conf (the
current ones, which add libcudadebugger and libnvidia-nvvm to the older list); a name
ending in `.so` matches every cache entry `NAME` or `NAME.*` (libcuda.so matches
libcuda.so.1 and libcuda.so), a longer name matches itself and `NAME.*`. A site adds
names with the policy keys gpu_extra_libs / ib_extra_libs (docs/gpu-ib.md).

ESSENTIAL_* names give a warning when the host lacks them (the container would not
work without them); the others only a note for --dry-run, since most hosts lack most of
the graphics libraries.
"""

NVIDIA_BINARIES = (
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
)

NVIDIA_LIBS = (
    "libcuda.so",
    "libcudadebugger.so",
    "libEGL_installertest.so",
    "libEGL_nvidia.so",
    "libEGL.so",
    "libGLdispatch.so",
    "libGLESv1_CM_nvidia.so",
    "libGLESv1_CM.so",
    "libGLESv2_nvidia.so",
    "libGLESv2.so",
    "libGL.so",
    "libGLX_installertest.so",
    "libGLX_nvidia.so",
    "libglx.so",
    "libGLX.so",
    "libnvcuvid.so",
    "libnvidia-cbl.so",
    "libnvidia-cfg.so",
    "libnvidia-compiler.so",
    "libnvidia-eglcore.so",
    "libnvidia-egl-wayland.so",
    "libnvidia-encode.so",
    "libnvidia-fatbinaryloader.so",
    "libnvidia-fbc.so",
    "libnvidia-glcore.so",
    "libnvidia-glsi.so",
    "libnvidia-glvkspirv.so",
    "libnvidia-gpucomp.so",
    "libnvidia-gtk2.so",
    "libnvidia-gtk3.so",
    "libnvidia-ifr.so",
    "libnvidia-ml.so",
    "libnvidia-nvvm.so",
    "libnvidia-opencl.so",
    "libnvidia-opticalflow.so",
    "libnvidia-ptxjitcompiler.so",
    "libnvidia-rtcore.so",
    "libnvidia-tls.so",
    "libnvidia-wfb.so",
    "libnvoptix.so",
    "libOpenCL.so",
    "libOpenGL.so",
    "libvdpau_nvidia.so",
    "nvidia_drv.so",
    "tls_test_.so",
)

NVIDIA_ESSENTIAL_LIBS = ("libcuda.so", "libnvidia-ml.so")
NVIDIA_ESSENTIAL_BINARIES = ("nvidia-smi",)

# Character devices of the driver (besides /dev/nvidia<N>, one per GPU).
NVIDIA_CONTROL_DEVICES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")

ROCM_BINARIES = (
    "rocm-smi",
    "rocminfo",
)

ROCM_LIBS = (
    "libamd_comgr.so",
    "libcomgr.so",
    "libCXLActivityLogger.so",
    "libelf.so",
    "libhc_am.so",
    "libhipblas.so",
    "libhip_hcc.so",
    "libhiprand.so",
    "libhsakmt.so",
    "libhsa-runtime64.so",
    "libmcwamp.so",
    "libmcwamp_cpu.so",
    "libmcwamp_hsa.so",
    "libmiopengemm.so",
    "libMIOpen.so",
    "libdrm.so",
    "libdrm_amdgpu.so",
    "libnuma.so",
    "libpci.so",
    "librccl.so",
    "librocblas.so",
    "librocfft-device.so",
    "librocfft.so",
    "librocrand.so",
    "librocr_debug_agent64.so",
    "libamdcomgr64.so",
    "libamdocl64.so",
    "libcltrace.so",
    "libOpenCL.so",
)

ROCM_ESSENTIAL_LIBS = ("libhsa-runtime64.so",)
ROCM_ESSENTIAL_BINARIES = ()
# ROCm installs its tools outside PATH; searched after the caller's PATH.
ROCM_BIN_DIRS = ("/opt/rocm/bin",)

# InfiniBand / RDMA user space (rdma-core). The providers (libibverbs/*.so next to
# libibverbs) and the libraries these need are added by ib.py.
IB_LIBS = (
    "libibverbs.so",
    "librdmacm.so",
    "libibumad.so",
    "libmlx5.so",
    "libmlx4.so",
    "libefa.so",
)
IB_ESSENTIAL_LIBS = ("libibverbs.so",)

# Libraries every image has from its own glibc / compiler: never taken from the host
# when following DT_NEEDED (a host libc in the container would break everything).
SYSTEM_SONAMES = frozenset((
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
    "libresolv.so.2", "libutil.so.1", "libanl.so.1", "libnsl.so.1", "libcrypt.so.1",
    "libBrokenLocale.so.1", "libmvec.so.1", "libthread_db.so.1", "libc_malloc_debug.so.0",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1", "ld-linux.so.2", "ld64.so.2",
    "ld64.so.1", "ld-linux-riscv64-lp64d.so.1", "ld-linux-x32.so.2",
    "libgcc_s.so.1", "libstdc++.so.6", "libatomic.so.1",
))


def matcher(names):
    """A function soname -> bool true when soname is one of names (or NAME.*)."""
    exact = frozenset(names)
    prefixes = tuple(n + "." for n in names)

    def match(soname):
        return soname in exact or soname.startswith(prefixes)
    return match


def which_name(soname, names):
    """The list entry of names that soname matches, or None."""
    for n in names:
        if soname == n or soname.startswith(n + "."):
            return n
    return None
