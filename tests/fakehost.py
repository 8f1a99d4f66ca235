"""A fake GPU/InfiniBand host tree, for HPCIMAGE_HOST_ROOT (built as root).

    build(root)            a host with 4 NVIDIA GPUs, 2 AMD GPUs and one mlx5 HCA
    build(root, devices=False)   the same libraries, no /dev nodes (a login node)

What is in it:
  /dev            nvidiactl 195:255, nvidia0..3 195:0..3, nvidia-modeset 195:254,
                  nvidia-uvm / nvidia-uvm-tools (dynamic major, here 235:0/1),
                  nvidia-caps/nvidia-cap1, kfd, dri/card0,card1,renderD128,renderD129,
                  infiniband/uverbs0 231:192, umad0 231:0, issm0 231:64, rdma_cm 10:58
  /usr/lib/<triplet>   stub libraries compiled with gcc under their real SONAMEs:
                  libcuda.so.1 (cuInit, cuDeviceGetCount: the /dev/nvidia<N> nodes it
                  sees, limited by CUDA_VISIBLE_DEVICES like CUDA), libnvidia-ml.so.1,
                  libnvidia-ptxjitcompiler.so.1, libibverbs.so.1 (needs libnl-3.so.200),
                  librdmacm.so.1, libmlx5.so.1, libnl-3.so.200, and the provider
                  libibverbs/libmlx5-rdmav34.so -> ../libmlx5.so.1.24.50.0
  /opt/rocm-6.0.0 (and /opt/rocm -> /opt/rocm-6.0.0, an absolute link)
                  lib/libhsa-runtime64.so.1, lib/libamd_comgr.so.2, bin/rocm-smi
  /usr/bin/nvidia-smi, nvidia-debugdump: shell scripts (nvidia-smi lists the
                  /dev/nvidia<N> it sees)
  /etc            ld.so.conf (+ ld.so.conf.d), ld.so.cache made by `ldconfig -r`,
                  libibverbs.d/mlx5.driver
  /proc/driver/nvidia/gpus/0000:0<N>:00.0/information, /sys/class/kfd topology
"""
import os
import shutil
import stat
import subprocess
import tempfile

DRIVER = "550.54.14"
NV_GPUS = 4
UVM_MAJOR = 235
CAPS_MAJOR = 234
KFD_MAJOR = 236

DEVICES = {   # path -> (major, minor)
    "dev/nvidiactl": (195, 255),
    "dev/nvidia-modeset": (195, 254),
    "dev/nvidia-uvm": (UVM_MAJOR, 0),
    "dev/nvidia-uvm-tools": (UVM_MAJOR, 1),
    "dev/nvidia-caps/nvidia-cap1": (CAPS_MAJOR, 1),
    "dev/kfd": (KFD_MAJOR, 0),
    "dev/dri/card0": (226, 0),
    "dev/dri/card1": (226, 1),
    "dev/dri/renderD128": (226, 128),
    "dev/dri/renderD129": (226, 129),
    "dev/infiniband/uverbs0": (231, 192),
    "dev/infiniband/umad0": (231, 0),
    "dev/infiniband/issm0": (231, 64),
    "dev/infiniband/rdma_cm": (10, 58),
}
for _i in range(NV_GPUS):
    DEVICES[f"dev/nvidia{_i}"] = (195, _i)

COUNT_NODES = r"""
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
static int count_nodes(const char *dir, const char *prefix) {
    int n = 0; size_t len = strlen(prefix); struct dirent *e; DIR *d = opendir(dir);
    if (!d) return 0;
    while ((e = readdir(d))) {
        const char *p = e->d_name;
        if (strncmp(p, prefix, len) != 0) continue;
        p += len;
        if (*p < '0' || *p > '9') continue;
        while (*p >= '0' && *p <= '9') p++;
        if (!*p) n++;
    }
    closedir(d);
    return n;
}
/* CUDA semantics: the listed indices that exist, up to the first invalid one. */
static int visible(int n, const char *var) {
    const char *v = getenv(var);
    int k = 0;
    if (!v) return n;
    while (*v) {
        int idx = 0, digits = 0;
        while (*v == ' ') v++;
        while (*v >= '0' && *v <= '9') { idx = idx * 10 + (*v - '0'); v++; digits++; }
        while (*v == ' ') v++;
        if (!digits || idx >= n || (*v && *v != ',')) break;
        k++;
        if (*v == ',') v++;
    }
    return k;
}
"""

SOURCES = {
    "cuda": COUNT_NODES + r"""
int cuInit(unsigned flags) { (void)flags; return visible(count_nodes("/dev", "nvidia"), "CUDA_VISIBLE_DEVICES") > 0 ? 0 : 100; }
int cuDeviceGetCount(int *count) { *count = visible(count_nodes("/dev", "nvidia"), "CUDA_VISIBLE_DEVICES"); return 0; }
int cuDriverGetVersion(int *v) { *v = 12040; return 0; }
""",
    "nvml": COUNT_NODES + r"""
int nvmlInit_v2(void) { return 0; }
int nvmlDeviceGetCount_v2(unsigned *c) { *c = count_nodes("/dev", "nvidia"); return 0; }
""",
    "ptxjit": "int __cudaPtxJitStub(int *v) { *v = 1; return 0; }\n",
    "nl": "int nl_stub_version(int *v) { *v = 200; return 0; }\n",
    "ibverbs": COUNT_NODES + r"""
extern int nl_stub_version(int *v);
void *ibv_get_device_list(int *num) { int x; nl_stub_version(&x); *num = count_nodes("/dev/infiniband", "uverbs"); return 0; }
""",
    "rdmacm": "extern void *ibv_get_device_list(int *);\n"
              "int rdma_stub_count(int *n) { ibv_get_device_list(n); return 0; }\n",
    "mlx5": "extern void *ibv_get_device_list(int *);\n"
            "int mlx5dv_stub(int *n) { ibv_get_device_list(n); return 0; }\n",
    "hsa": COUNT_NODES + r"""
int hsa_init(void) { return 0; }
int hsa_stub_agents(int *n) { *n = count_nodes("/dev/dri", "renderD"); return 0; }
""",
    "comgr": "int amd_comgr_stub(int *v) { *v = 2; return 0; }\n",
}

NVIDIA_SMI = """#!/bin/sh
# fake nvidia-smi: the GPUs whose /dev/nvidia<N> node this process can see
i=0
for d in /dev/nvidia[0-9]*; do
    [ -e "$d" ] || continue
    n=${d#/dev/nvidia}
    echo "GPU $i: NVIDIA Fake H100 (UUID: GPU-00000000-0000-0000-0000-00000000000$n)"
    i=$((i+1))
done
"""

ROCM_SMI = """#!/bin/sh
echo "fake rocm-smi: $(ls /dev/dri 2>/dev/null | grep -c renderD) GPU(s)"
"""


def triplet():
    r = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True)
    return r.stdout.strip() or f"{os.uname().machine}-linux-gnu"


def compile_lib(path, soname, source, needed=(), libdirs=()):
    """gcc -shared a stub library at path with DT_SONAME soname, linked against the
    files named in needed (sonames, found in libdirs)."""
    with tempfile.NamedTemporaryFile("w", suffix=".c", delete=False) as f:
        f.write(source)
    try:
        argv = ["gcc", "-shared", "-fPIC", "-O0", "-o", str(path), f.name,
                f"-Wl,-soname,{soname}"]
        for d in libdirs:
            argv.append(f"-L{d}")
        for n in needed:
            argv.append(f"-l:{n}")
        subprocess.run(argv, check=True, capture_output=True, text=True)
    finally:
        os.unlink(f.name)


def _write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _link(target, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        os.unlink(path)
    os.symlink(target, path)


def make_devices(root):
    for rel, (major, minor) in DEVICES.items():
        p = os.path.join(root, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.unlink(p)
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(p, 0o666)


def build(root, devices=True, cache_format="new"):
    """Build the fake host at root (a new or empty directory); returns root."""
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    trip = triplet()
    lib = os.path.join(root, "usr/lib", trip)
    os.makedirs(lib, exist_ok=True)

    def stub(real, soname, src, needed=(), libdirs=(lib,)):
        compile_lib(os.path.join(lib, real) if "/" not in real else os.path.join(root, real),
                    soname, SOURCES[src], needed, libdirs)

    stub(f"libcuda.so.{DRIVER}", "libcuda.so.1", "cuda")
    stub(f"libnvidia-ml.so.{DRIVER}", "libnvidia-ml.so.1", "nvml")
    stub(f"libnvidia-ptxjitcompiler.so.{DRIVER}", "libnvidia-ptxjitcompiler.so.1", "ptxjit")
    for real, soname in ((f"libcuda.so.{DRIVER}", "libcuda.so.1"),
                         (f"libnvidia-ml.so.{DRIVER}", "libnvidia-ml.so.1"),
                         (f"libnvidia-ptxjitcompiler.so.{DRIVER}",
                          "libnvidia-ptxjitcompiler.so.1")):
        _link(real, os.path.join(lib, soname))
    _link("libcuda.so.1", os.path.join(lib, "libcuda.so"))

    stub("libnl-3.so.200.26.0", "libnl-3.so.200", "nl")
    _link("libnl-3.so.200.26.0", os.path.join(lib, "libnl-3.so.200"))
    stub("libibverbs.so.1.14.50.0", "libibverbs.so.1", "ibverbs", needed=("libnl-3.so.200",))
    _link("libibverbs.so.1.14.50.0", os.path.join(lib, "libibverbs.so.1"))
    stub("librdmacm.so.1.3.50.0", "librdmacm.so.1", "rdmacm", needed=("libibverbs.so.1",))
    _link("librdmacm.so.1.3.50.0", os.path.join(lib, "librdmacm.so.1"))
    stub("libmlx5.so.1.24.50.0", "libmlx5.so.1", "mlx5", needed=("libibverbs.so.1",))
    _link("libmlx5.so.1.24.50.0", os.path.join(lib, "libmlx5.so.1"))
    _link("../libmlx5.so.1.24.50.0", os.path.join(lib, "libibverbs", "libmlx5-rdmav34.so"))
    _write(os.path.join(root, "etc/libibverbs.d/mlx5.driver"), "driver mlx5\n")

    rocm = os.path.join(root, "opt/rocm-6.0.0")
    os.makedirs(os.path.join(rocm, "lib"), exist_ok=True)
    compile_lib(os.path.join(rocm, "lib/libhsa-runtime64.so.1.12.60000"),
                "libhsa-runtime64.so.1", SOURCES["hsa"])
    _link("libhsa-runtime64.so.1.12.60000", os.path.join(rocm, "lib/libhsa-runtime64.so.1"))
    compile_lib(os.path.join(rocm, "lib/libamd_comgr.so.2.6.60000"),
                "libamd_comgr.so.2", SOURCES["comgr"])
    _link("libamd_comgr.so.2.6.60000", os.path.join(rocm, "lib/libamd_comgr.so.2"))
    _link("/opt/rocm-6.0.0", os.path.join(root, "opt/rocm"))
    _write(os.path.join(rocm, "bin/rocm-smi"), ROCM_SMI, 0o755)

    _write(os.path.join(root, "usr/bin/nvidia-smi"), NVIDIA_SMI, 0o755)
    _write(os.path.join(root, "usr/bin/nvidia-debugdump"), "#!/bin/sh\necho debugdump\n", 0o755)

    _write(os.path.join(root, "etc/ld.so.conf"), "include /etc/ld.so.conf.d/*.conf\n")
    _write(os.path.join(root, f"etc/ld.so.conf.d/{trip}.conf"),
           f"/usr/local/lib/{trip}\n/lib/{trip}\n/usr/lib/{trip}\n")
    _write(os.path.join(root, "etc/ld.so.conf.d/rocm.conf"), "/opt/rocm/lib\n")
    os.makedirs(os.path.join(root, "var/cache/ldconfig"), exist_ok=True)
    subprocess.run(["ldconfig", "-r", root, "-c", cache_format], check=True,
                   capture_output=True, text=True)

    for i in range(NV_GPUS):
        _write(os.path.join(root, f"proc/driver/nvidia/gpus/0000:0{i + 1}:00.0/information"),
               f"Model: \t\t NVIDIA Fake H100\nIRQ:   \t\t {40 + i}\n"
               f"GPU UUID: \t GPU-00000000-0000-0000-0000-00000000000{i}\n"
               f"Bus Location: \t 0000:0{i + 1}:00.0\nDevice Minor: \t {i}\n"
               "GPU Excluded:\t No\n")
    topo = os.path.join(root, "sys/class/kfd/kfd/topology/nodes")
    _write(os.path.join(topo, "0/properties"),
           "cpu_cores_count 16\nsimd_count 0\ndrm_render_minor 0\n")
    _write(os.path.join(topo, "1/properties"),
           "cpu_cores_count 0\nsimd_count 256\ndrm_render_minor 128\n")
    _write(os.path.join(topo, "2/properties"),
           "cpu_cores_count 0\nsimd_count 256\ndrm_render_minor 129\n")

    os.makedirs(os.path.join(root, "dev"), exist_ok=True)
    if devices:
        make_devices(root)
    subprocess.run(["chmod", "-R", "a+rX", root], check=True)
    return root


def without_devices(src, dst):
    """A copy of the fake host src at dst with an empty /dev (no GPU, no HCA)."""
    shutil.copytree(src, dst, symlinks=True, ignore=lambda d, names: (
        ["dev"] if os.path.abspath(d) == os.path.abspath(src) else []))
    os.makedirs(os.path.join(dst, "dev"), exist_ok=True)
    subprocess.run(["chmod", "-R", "a+rX", dst], check=True)
    return dst
