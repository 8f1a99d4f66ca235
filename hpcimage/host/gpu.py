"""GPU passthrough (--nv, --rocm, policy `gpu`): devices, driver libraries, tools.

NVIDIA: the driver's control nodes (/dev/nvidiactl, nvidia-uvm, nvidia-uvm-tools,
nvidia-modeset, /dev/nvidia-caps), /dev/nvidia<N> of the visible GPUs, the libraries of
Apptainer's nvliblist found in the host's ld.so.cache (64-bit, this machine's ELF
machine) bound one by one into /.singularity.d/libs (prepended to LD_LIBRARY_PATH),
and the driver's tools (nvidia-smi, ...) bound into /.singularity.d/bin (prepended to
PATH). AMD: /dev/kfd, the visible GPUs' /dev/dri/renderD<M> (all of /dev/dri when all
are visible), rocmliblist libraries and rocm-smi/rocminfo the same way.

Visible devices (docs/gpu-ib.md): CUDA_VISIBLE_DEVICES, else NVIDIA_VISIBLE_DEVICES,
of the caller selects the /dev/nvidia<N> bound; the others are listed in
Contribution.hide. Inside, CUDA_VISIBLE_DEVICES is renumbered the way Sarus does it:
each host index becomes its rank among the selected ones (host 3,1 -> 1,0), since the
container's driver enumerates only the GPUs it can open, in host order. ROCm:
ROCR_VISIBLE_DEVICES likewise.

Pure: reads the host through a HostRoot, returns a Contribution; never runs ldconfig
or nvidia-smi. Standard library only.
"""

from hpcimage.host.root import Contribution
from hpcimage.host.root import choice, nvidia_gate, rocm_gate
# The tables (hpcimage.host.gpulibs, as L) and the ld.so.cache reader are imported in
# the functions, past the checks that turn a discovery off: a node without GPUs does
# not pay for them on every image-exec.

from hpcimage.host.root import LIBS_DIR  # noqa: E402
BIN_DIR = "/.singularity.d/bin"
DEFAULT_PATH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin",
                     "/sbin", "/bin")
from hpcimage.config.policy import DEVICE_MODES  # noqa: E402
NONE_VALUES = ("", "none", "void", "nodevfiles")


# --------------------------------------------------------------------- policy

def str_list(policy, key):
    v = getattr(policy, key) or ()
    if isinstance(v, str):
        v = [v]
    return [x for x in v if isinstance(x, str) and x]



# ------------------------------------------------------------ visible devices

def parse_visible(value, count, uuids=None):
    """Parse a *_VISIBLE_DEVICES value against devices 0..count-1.

    Returns (mode, indices, problem): mode "all" (unset/`all`), "none" (empty,
    `none`, `void`, Slurm's `NoDevFiles`), "some" (indices: host indices in the
    order given, duplicates dropped), or "unmapped" (entries we cannot map, e.g. MIG
    UUIDs: bind all, leave the variable alone). As CUDA does, an invalid entry ends
    the list (it and the rest are ignored); problem then says which.
    uuids: {uuid: index} for entries like GPU-8932f937-... (a unique prefix is enough)."""
    if value is None or value.strip().lower() == "all":
        return "all", None, ""
    v = value.strip()
    if v.lower() in NONE_VALUES:
        return "none", [], ""
    out = []
    problem = ""
    for item in v.split(","):
        item = item.strip()
        idx = None
        if item.isdigit() and item.isascii():
            idx = int(item)
            if idx >= count:
                problem = f"device {item} does not exist (the host has {count})"
                break
        elif item.startswith("MIG-"):
            return "unmapped", None, f"MIG device {item} cannot be mapped to a GPU node"
        elif item.startswith("GPU-") and uuids is not None:
            hits = {i for u, i in uuids.items() if u.startswith(item)}
            if len(hits) != 1:
                problem = f"{item} matches {'no' if not hits else 'more than one'} GPU"
                break
            idx = hits.pop()
        elif item.startswith("GPU-"):
            return "unmapped", None, f"{item}: no GPU UUIDs readable on this host"
        else:
            problem = f"{item!r} is not a device index"
            break
        if idx not in out:
            out.append(idx)
    return "some", out, problem


def renumber(indices):
    """Container-side value for host indices given in order: each index's rank among
    the selected ones (Sarus's rule, numeric order): [3, 1] -> "1,0"."""
    ranks = {h: r for r, h in enumerate(sorted(set(indices)))}
    return ",".join(str(ranks[h]) for h in indices)


# ----------------------------------------------------------------- libraries

def bind_libraries(host, cache, names, c, *, why, tag, essential=(), extra=(),
                   exclude=(), dst_dir=LIBS_DIR):
    """Bind the host libraries whose sonames match names (+ extra - exclude) from the
    host's ld.so.cache into dst_dir. Returns {soname: real path} of those bound."""
    from hpcimage.host import elf, gpulibs as L
    names = tuple(n for n in tuple(names) + tuple(extra) if n not in set(exclude))
    if not names:
        return {}
    found = cache.select(L.matcher(names), want64=True)
    if cache.error:
        c.warnings.append(f"{tag}: cannot read the host's library cache ({cache.error}); "
                          "no driver libraries bound")
        return {}
    machine = elf.host_machine()
    bound = {}
    matched = set()
    for soname in sorted(found):
        try:
            real = host.realpath(found[soname])
        except OSError as e:
            c.warnings.append(f"{tag}: {found[soname]}: {e.strerror}")
            continue
        try:
            elfclass, _bo, em = elf.header(real)
        except OSError as e:
            c.notes.append(f"{tag}: {soname}: {found[soname]} listed in ld.so.cache "
                           f"but unreadable ({e.strerror}); skipped")
            continue
        except ValueError as e:
            c.warnings.append(f"{tag}: {found[soname]} ({soname}): {e}; skipped")
            continue
        if elfclass != 64 or (machine is not None and em != machine):
            c.notes.append(f"{tag}: {soname}: {found[soname]} is for another machine "
                           f"(ELF{elfclass}, e_machine {em}); skipped")
            continue
        if c.bind(real, f"{dst_dir}/{soname}", True, why):
            bound[soname] = real
            matched.add(L.which_name(soname, names))
    optional = []
    for n in names:
        if n in matched:
            continue
        if n in essential or n in extra:
            c.warnings.append(f"{tag}: library {n} not found in the host's ld.so.cache "
                              f"(is the driver installed?)")
        else:
            optional.append(n)
    if optional:
        c.notes.append(f"{tag}: not on the host (optional): {', '.join(optional)}")
    if bound:
        c.add_prepend("LD_LIBRARY_PATH", dst_dir)
    return bound


def bind_binaries(host, environ, names, c, *, why, tag, essential=(), extra_dirs=()):
    """Bind the first executable of each name on the host's PATH (+ extra_dirs) into
    /.singularity.d/bin. Returns {name: real path}."""
    dirs = [d for d in (environ.get("PATH") or "").split(":") if d.startswith("/")]
    dirs += [d for d in DEFAULT_PATH_DIRS + tuple(extra_dirs) if d not in dirs]
    bound = {}
    optional = []
    for name in names:
        p = host.which(name, dirs)
        if p is None:
            if name in essential:
                c.warnings.append(f"{tag}: {name} not found on the host (PATH, "
                                  f"{', '.join(DEFAULT_PATH_DIRS + tuple(extra_dirs))})")
            else:
                optional.append(name)
            continue
        real = host.realpath(p)
        if c.bind(real, f"{BIN_DIR}/{name}", True, why):
            bound[name] = real
    if optional:
        c.notes.append(f"{tag}: not on the host (optional): {', '.join(optional)}")
    if bound:
        c.add_prepend("PATH", BIN_DIR)
    return bound


def bind_extra_devices(host, policy, c, tag):
    """gpu_extra_devices: host paths under /dev (a trailing * matches a prefix)."""
    for spec in str_list(policy, "gpu_extra_devices"):
        if not spec.startswith("/dev/"):
            c.warnings.append(f"{tag}: gpu_extra_devices {spec!r} is not under /dev; ignored")
            continue
        if spec.endswith("*"):
            d, _, prefix = spec[:-1].rpartition("/")
            paths = [f"{d}/{n}" for n in host.listdir(d) if n.startswith(prefix)]
        else:
            paths = [spec] if host.exists(spec) else []
        if not paths:
            c.warnings.append(f"{tag}: extra device {spec} not found on the host")
        for p in paths:
            c.bind(host.realpath(p), p, False, f"{tag}: site gpu_extra_devices")


# -------------------------------------------------------------------- NVIDIA

def nvidia_gpus(host):
    """[(index, minor, uuid)] of the host's NVIDIA GPUs in NVML/CUDA index order.

    From /proc/driver/nvidia/gpus/<bus id>/information (sorted by PCI bus id, which
    is NVML's order, with "Device Minor" and "GPU UUID"); without it, from the
    /dev/nvidia<N> nodes (index = rank of N)."""
    gpus = []
    for bus in host.listdir("/proc/driver/nvidia/gpus"):
        try:
            text = host.read_text(f"/proc/driver/nvidia/gpus/{bus}/information", 65536)
        except OSError:
            continue
        fields = {}
        for line in text.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                fields[k.strip()] = v.strip()
        minor = fields.get("Device Minor", "")
        if minor.isdigit():
            uuid = fields.get("GPU UUID") or None
            gpus.append((bus.lower(), int(minor), uuid))
    if gpus:
        gpus.sort()
        return [(i, m, u) for i, (_b, m, u) in enumerate(gpus)]
    minors = sorted(int(n[6:]) for n in host.listdir("/dev")
                    if n.startswith("nvidia") and n[6:].isdigit() and n[6:].isascii())
    return [(i, m, None) for i, m in enumerate(minors)]


def discover_nvidia(host, policy, environ, force=False, cache=None):
    """Contribution for NVIDIA GPUs: on with force (--nv) or policy gpu auto|nvidia
    when /dev/nvidiactl exists on the host; empty otherwise."""
    c = Contribution()
    tag = "--nv" if force else "gpu (nvidia)"
    present = nvidia_gate(host, policy, force, c)
    if present is None:
        return c
    from hpcimage.host import gpulibs as L
    dev_mode = choice(policy, "gpu_devices", DEVICE_MODES, "visible", c)
    why_dev = f"{tag}: device"
    if not present:
        c.warnings.append(f"{tag}: no NVIDIA GPU on this host (/dev/nvidiactl missing); "
                          "binding the driver libraries only")
    else:
        for name in L.NVIDIA_CONTROL_DEVICES:
            p = "/dev/" + name
            if host.ischr(p):
                c.bind(host.realpath(p), p, False, why_dev)
            elif name == "nvidia-uvm":
                c.warnings.append(f"{tag}: /dev/nvidia-uvm missing on the host: CUDA needs "
                                  "it and cannot create it in the container (load the "
                                  "nvidia-uvm module, e.g. nvidia-modprobe -u -c=0 at boot)")
            else:
                c.notes.append(f"{tag}: no /dev/{name} on the host")
        if host.isdir("/dev/nvidia-caps"):
            c.bind(host.realpath("/dev/nvidia-caps"), "/dev/nvidia-caps", False,
                   f"{tag}: MIG capabilities")
        _nvidia_gpus(host, environ, dev_mode, c, tag)
    bind_extra_devices(host, policy, c, tag)

    if cache is None:
        from hpcimage.host.ldcache import LdCache
        cache = LdCache(host)
    bind_libraries(host, cache, L.NVIDIA_LIBS, c, why=f"{tag}: driver library", tag=tag,
                   essential=L.NVIDIA_ESSENTIAL_LIBS,
                   extra=str_list(policy, "gpu_extra_libs"),
                   exclude=str_list(policy, "gpu_exclude_libs"))
    bind_binaries(host, environ,
                  L.NVIDIA_BINARIES + tuple(str_list(policy, "gpu_extra_binaries")),
                  c, why=f"{tag}: driver tool", tag=tag,
                  essential=L.NVIDIA_ESSENTIAL_BINARIES
                  + tuple(str_list(policy, "gpu_extra_binaries")))
    return c


def _nvidia_gpus(host, environ, dev_mode, c, tag):
    gpus = nvidia_gpus(host)
    node = {i: m for i, m, _u in gpus}
    uuids = {u: i for i, _m, u in gpus if u}
    var = next((v for v in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")
                if v in environ), None)
    value = environ.get(var) if var else None
    kind, indices, problem = parse_visible(value, len(gpus), uuids or None)
    if problem:
        c.warnings.append(f"{tag}: {var}={value}: {problem}; "
                          + ("binding every GPU and leaving it as is" if kind == "unmapped"
                             else "it and the entries after it are ignored, as CUDA does"))
    if dev_mode == "all" or kind in ("all", "unmapped"):
        chosen = [i for i, _m, _u in gpus]
        renum = None
    else:
        chosen = indices
        renum = renumber(indices) if var == "CUDA_VISIBLE_DEVICES" and kind == "some" else None
    for i in chosen:
        p = f"/dev/nvidia{node[i]}"
        if host.ischr(p):
            c.bind(host.realpath(p), p, False, f"{tag}: GPU {i}")
        else:
            c.warnings.append(f"{tag}: GPU {i}: {p} missing on the host")
    for i, m, _u in gpus:
        if i not in chosen and host.exists(f"/dev/nvidia{m}"):
            c.hide.append(f"/dev/nvidia{m}")
    if renum is not None:
        c.env["CUDA_VISIBLE_DEVICES"] = renum
        if renum != value:
            c.notes.append(f"{tag}: CUDA_VISIBLE_DEVICES={value} on the host is "
                           f"{renum} in the container (only those GPUs are there)")
    c.notes.append(f"{tag}: {len(chosen)} of {len(gpus)} GPUs visible"
                   + (f" ({var}={value})" if var else ""))


# ---------------------------------------------------------------------- ROCm

def rocm_render_minors(host):
    """DRM render minors of the host's AMD GPUs in ROCr's order (KFD topology node
    order, CPU nodes skipped); without the topology, the /dev/dri/renderD<M> nodes."""
    base = "/sys/class/kfd/kfd/topology/nodes"
    nodes = sorted((int(n), n) for n in host.listdir(base) if n.isdigit() and n.isascii())
    minors = []
    for _k, n in nodes:
        try:
            text = host.read_text(f"{base}/{n}/properties", 65536)
        except OSError:
            continue
        props = {}
        for line in text.splitlines():
            k, _sep, v = line.strip().partition(" ")
            props[k] = v.strip()
        m = props.get("drm_render_minor", "")
        if m.isdigit() and int(m) > 0 and props.get("simd_count", "1") != "0":
            minors.append(int(m))
    if minors:
        return minors
    return sorted(int(n[7:]) for n in host.listdir("/dev/dri")
                  if n.startswith("renderD") and n[7:].isdigit() and n[7:].isascii())


def discover_rocm(host, policy, environ, force=False, cache=None):
    """Contribution for AMD GPUs (ROCm): on with force (--rocm) or policy gpu
    auto|rocm when /dev/kfd exists on the host; empty otherwise."""
    c = Contribution()
    tag = "--rocm" if force else "gpu (rocm)"
    present = rocm_gate(host, policy, force, c)
    if present is None:
        return c
    from hpcimage.host import gpulibs as L
    dev_mode = choice(policy, "gpu_devices", DEVICE_MODES, "visible", c)
    if not present:
        c.warnings.append(f"{tag}: no AMD GPU on this host (/dev/kfd missing); "
                          "binding the ROCm libraries only")
    else:
        c.bind(host.realpath("/dev/kfd"), "/dev/kfd", False, f"{tag}: device")
        minors = rocm_render_minors(host)
        value = environ.get("ROCR_VISIBLE_DEVICES")
        kind, indices, problem = parse_visible(value, len(minors))
        if problem:
            c.warnings.append(f"{tag}: ROCR_VISIBLE_DEVICES={value}: {problem}; "
                              + ("binding every GPU and leaving it as is"
                                 if kind == "unmapped" else
                                 "it and the entries after it are ignored"))
        if dev_mode == "all" or kind in ("all", "unmapped"):
            if host.isdir("/dev/dri"):
                c.bind(host.realpath("/dev/dri"), "/dev/dri", False, f"{tag}: GPUs")
            else:
                c.warnings.append(f"{tag}: /dev/dri missing on the host")
            chosen = list(range(len(minors)))
        else:
            chosen = indices
            for i in chosen:
                p = f"/dev/dri/renderD{minors[i]}"
                if host.ischr(p):
                    c.bind(host.realpath(p), p, False, f"{tag}: GPU {i}")
                else:
                    c.warnings.append(f"{tag}: GPU {i}: {p} missing on the host")
            for i, m in enumerate(minors):
                if i not in chosen and host.exists(f"/dev/dri/renderD{m}"):
                    c.hide.append(f"/dev/dri/renderD{m}")
            if kind == "some":
                c.env["ROCR_VISIBLE_DEVICES"] = renumber(indices)
        c.notes.append(f"{tag}: {len(chosen)} of {len(minors)} GPUs visible"
                       + (f" (ROCR_VISIBLE_DEVICES={value})" if value is not None else ""))
    bind_extra_devices(host, policy, c, tag)

    if cache is None:
        from hpcimage.host.ldcache import LdCache
        cache = LdCache(host)
    bind_libraries(host, cache, L.ROCM_LIBS, c, why=f"{tag}: ROCm library", tag=tag,
                   essential=L.ROCM_ESSENTIAL_LIBS,
                   extra=str_list(policy, "gpu_extra_libs"),
                   exclude=str_list(policy, "gpu_exclude_libs"))
    bind_binaries(host, environ,
                  L.ROCM_BINARIES + tuple(str_list(policy, "gpu_extra_binaries")),
                  c, why=f"{tag}: ROCm tool", tag=tag,
                  essential=L.ROCM_ESSENTIAL_BINARIES
                  + tuple(str_list(policy, "gpu_extra_binaries")),
                  extra_dirs=L.ROCM_BIN_DIRS)
    return c
