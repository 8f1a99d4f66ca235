"""The bind-spec grammar, Apptainer's: `SRC[:DST[:OPTIONS]]`, specs separated by commas.

    split_list("a,b:/x:ro,image-src=/d,c")  -> ["a", "b:/x:ro,image-src=/d", "c"]
    parse("dir\\,x:/data:ro")               -> BindSpec(src="dir,x", dst="/data", ro=True)

OPTIONS is a comma-separated list of `ro`, `rw`, `image-src=PATH` (a path inside the
image file that SRC names, "/" by default) and `id=N` (a SIF partition's id). A comma
after a spec that has an OPTIONS field continues that list when the next word is an
option; otherwise it starts the next spec. `\\,` is a literal comma and `\\:` a literal
colon (in SRC, DST and option values), `\\\\` a literal backslash; a backslash before
any other character is itself. DST defaults to SRC.

Here (not in runtime/) because site.yaml's binds (config.site, admin side) and the
runtime's (-B, *_BIND, *_BINDPATH, site.json) are read by the same grammar, and config
is the room below both. Standard library only, no re: the runtime imports it on the hot
path. Errors are ValueError with a message that names the spec.
"""

# name -> takes a value
OPTIONS = {"ro": False, "rw": False, "image-src": True, "id": True}

_ESCAPABLE = ",:\\"


class BindSpec:
    """src: the source, as written (escapes undone); dst: the destination, None when
    the spec names none; ro: `ro` given; image_src: the path inside an image file
    (`image-src=`, "/" where only `id=` is given), else None; part_id: the SIF
    partition's id (`id=N`), else None; spec: the spec as written."""
    __slots__ = ("src", "dst", "ro", "image_src", "part_id", "spec")

    def __init__(self, src, dst=None, ro=False, image_src=None, part_id=None, spec=""):
        self.src, self.dst, self.ro = src, dst, ro
        self.image_src, self.part_id, self.spec = image_src, part_id, spec

    @property
    def is_image(self):
        return self.image_src is not None

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    __hash__ = None

    def __repr__(self):
        return "BindSpec(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"


def _split(text, sep):
    """text cut at each sep that no backslash escapes; escapes kept."""
    out, cur, i, n = [], [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            cur.append(text[i:i + 2])
            i += 2
            continue
        if c == sep:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def unescape(text):
    """`\\,` -> `,`, `\\:` -> `:`, `\\\\` -> `\\`; any other backslash stays."""
    if "\\" not in text:
        return text
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            out.append(text[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _is_option(word):
    name, eq, _ = word.partition("=")
    return name in OPTIONS and OPTIONS[name] == bool(eq)


def _has_options_field(spec):
    return len(_split(spec, ":")) >= 3


def split_list(text):
    """The specs of a comma-separated list (-B's value, *_BIND), escapes kept; empty
    items dropped."""
    specs = []
    for word in _split(text, ","):
        word = word.strip()          # as Apptainer trims each word
        if specs and _is_option(word) and _has_options_field(specs[-1]):
            specs[-1] += "," + word
        elif word:
            specs.append(word)
    return specs


def parse(spec):
    """The BindSpec of one spec; ValueError saying what is wrong."""
    fields = _split(spec, ":")
    if len(fields) > 3:
        raise ValueError(f"bind {spec!r}: too many ':' (want SRC[:DST[:OPTIONS]]; "
                         "a ':' in a path is written '\\:')")
    src = unescape(fields[0])
    if not src:
        raise ValueError(f"bind {spec!r}: missing source (want SRC[:DST[:OPTIONS]])")
    dst = unescape(fields[1]) if len(fields) > 1 and fields[1] else None
    if dst is not None and not dst.startswith("/"):
        raise ValueError(f"bind {spec!r}: destination must be an absolute path")
    b = BindSpec(src, dst, spec=spec)
    if len(fields) < 3:
        return b
    seen = set()
    for word in _split(fields[2], ","):
        name, eq, value = word.partition("=")
        if name not in OPTIONS or OPTIONS[name] != bool(eq):
            what = f"unknown option {word!r}" if word else "empty option"
            raise ValueError(f"bind {spec!r}: {what} (options: ro, rw, image-src=PATH, id=N)")
        if name in seen or (name in ("ro", "rw") and seen & {"ro", "rw"}):
            raise ValueError(f"bind {spec!r}: option {name!r} conflicts with an earlier one")
        seen.add(name)
        value = unescape(value)
        if name == "ro":
            b.ro = True
        elif name == "image-src":
            if value and not value.startswith("/"):
                raise ValueError(f"bind {spec!r}: image-src must be an absolute path "
                                 "inside the image")
            b.image_src = value or "/"
        elif name == "id":
            if not value.isdigit() or int(value) <= 0:
                raise ValueError(f"bind {spec!r}: id must be a partition number above 0, "
                                 f"not {value!r}")
            b.part_id = int(value)
    if b.part_id is not None and b.image_src is None:
        b.image_src = "/"
    return b
