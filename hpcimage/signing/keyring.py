"""OpenPGP keyrings in Apptainer's format, and the keys in them (`hpcimage key ...`).

A keyring file is a plain stream of binary OpenPGP transferable keys, as Apptainer
writes `~/.apptainer/keys/pgp-public|pgp-secret` (`gpg --export` /
`--export-secret-keys` output): the one format written here, always atomically
(fsutil). The locations (shared with `hpcimage sign|verify`):

    personal   $HPCIMAGE_KEYSDIR else ~/.hpcimage/keys/   pgp-public, pgp-secret (0600, dir 0700)
    Apptainer  $APPTAINER_KEYSDIR else ~/.apptainer/keys/  read, never written
    global     /etc/hpcimage/global-pgp-public            written by root (--global), 0644
               /etc/apptainer/, /usr/local/etc/apptainer/global-pgp-public   read

Key handling is GnuPG's: `gpg` in a private temporary home (never ~/.gnupg) to read keys
(`--show-keys`) and make new ones; the keyring files themselves are cut into keys
(one Public-Key or Secret-Key packet and what follows it) here, so removing or
exporting a key needs no passphrase. Errors: HpcimageError (2 bad input, 1 failed).
"""
import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
import time

from hpcimage.errors import HpcimageError, UsageError
from hpcimage.fsutil import write_atomic

PUBLIC, SECRET, GLOBAL = "pgp-public", "pgp-secret", "global-pgp-public"
GLOBAL_DIR = "/etc/hpcimage"
APPTAINER_GLOBAL_DIRS = ("/etc/apptainer", "/usr/local/etc/apptainer")


# ------------------------------------------------------------------ the locations

def keys_dir(environ=None):
    """The personal keyring directory: $HPCIMAGE_KEYSDIR, else ~/.hpcimage/keys."""
    env = os.environ if environ is None else environ
    d = env.get("HPCIMAGE_KEYSDIR")
    return d if d else os.path.join(_home(env), ".hpcimage", "keys")


def apptainer_keys_dir(environ=None):
    """Apptainer's own: $APPTAINER_KEYSDIR, else ~/.apptainer/keys (read only)."""
    env = os.environ if environ is None else environ
    d = env.get("APPTAINER_KEYSDIR")
    return d if d else os.path.join(_home(env), ".apptainer", "keys")


def global_public_path():
    """hpcimage's global public keyring (written by root with --global)."""
    return os.path.join(GLOBAL_DIR, GLOBAL)


def keys_dirs(environ=None):
    """The personal key directories: hpcimage's first, then Apptainer's."""
    return [keys_dir(environ), apptainer_keys_dir(environ)]


GLOBAL_PUBLIC = (os.path.join(GLOBAL_DIR, GLOBAL),
                 *(os.path.join(d, GLOBAL) for d in APPTAINER_GLOBAL_DIRS))


def _home(env):
    return env.get("HOME") or os.path.expanduser("~")


def public_keyring_files(include_global=True, environ=None):
    """The public keyrings to trust, in order, the existing files only: the personal
    one, Apptainer's personal one, then (include_global) hpcimage's global keyring and
    Apptainer's global ones."""
    paths = [os.path.join(keys_dir(environ), PUBLIC),
             os.path.join(apptainer_keys_dir(environ), PUBLIC)]
    if include_global:
        paths.append(global_public_path())
        paths += [os.path.join(d, GLOBAL) for d in APPTAINER_GLOBAL_DIRS]
    return _existing(paths)


def secret_keyring_files(environ=None):
    """The secret keyrings, in order, the existing files only: the personal one, then
    Apptainer's personal one."""
    return _existing([os.path.join(keys_dir(environ), SECRET),
                      os.path.join(apptainer_keys_dir(environ), SECRET)])


def _existing(paths):
    out = []
    for p in paths:
        if os.path.isfile(p) and p not in out:
            out.append(p)
    return out


# ------------------------------------------------------------ packets and armour

class Key:
    """One transferable key of a keyring: its bytes (`data`), and what gpg says of it:
    fingerprint (40 upper-case hex digits), keyid, algo (OpenPGP number), bits,
    created (epoch), uids (strings), secret (bool)."""
    __slots__ = ("data", "fingerprint", "keyid", "algo", "bits", "created", "uids",
                 "secret")

    def __init__(self, data, secret):
        self.data, self.secret = data, secret
        self.fingerprint = self.keyid = ""
        self.algo = self.bits = self.created = 0
        self.uids = []

    def public(self):
        """The key's public part (a secret key's packets made public ones): a Key."""
        if not self.secret:
            return self
        k = Key(public_part(self.data), False)
        for a in ("fingerprint", "keyid", "algo", "bits", "created", "uids"):
            setattr(k, a, getattr(self, a))
        return k


def _packets(data):
    """[(tag, start, body_start, end)] of the OpenPGP packets in DATA; UsageError when
    it is no packet stream."""
    out, i, n = [], 0, len(data)
    while i < n:
        b = data[i]
        if not b & 0x80:
            raise UsageError("not an OpenPGP key (bad packet header)")
        try:
            if b & 0x40:
                tag, o = b & 0x3F, data[i + 1]
                if o < 192:
                    length, hdr = o, 2
                elif o < 224:
                    length, hdr = ((o - 192) << 8) + data[i + 2] + 192, 3
                elif o == 255:
                    length, hdr = int.from_bytes(data[i + 2:i + 6], "big"), 6
                else:
                    raise UsageError("not an OpenPGP key (partial packet lengths)")
            else:
                tag, lt = (b >> 2) & 0x0F, b & 3
                if lt == 3:
                    raise UsageError("not an OpenPGP key (indeterminate packet length)")
                size = 1 << lt
                length = int.from_bytes(data[i + 1:i + 1 + size], "big")
                hdr = 1 + size
        except IndexError:
            raise UsageError("not an OpenPGP key (truncated)") from None
        end = i + hdr + length
        if end > n:
            raise UsageError("not an OpenPGP key (truncated)")
        out.append((tag, i, i + hdr, end))
        i = end
    return out


def split(data):
    """DATA (binary OpenPGP) cut into transferable keys: [(bytes, secret)]."""
    keys = []
    for tag, start, _b, end in _packets(data):
        if tag in (5, 6):
            keys.append([start, end, tag == 5])
        elif not keys:
            raise UsageError("not an OpenPGP key (no key packet first)")
        else:
            keys[-1][1] = end
    return [(data[s:e], sec) for s, e, sec in keys]


def _mpi_end(body, i, count):
    for _ in range(count):
        bits = int.from_bytes(body[i:i + 2], "big")
        i += 2 + (bits + 7) // 8
    return i


def _public_len(body):
    """The length of the public part of a v4 key packet's BODY."""
    if not body or body[0] != 4:
        raise UsageError(f"unsupported OpenPGP key version {body[0] if body else '?'} "
                         "(hpcimage handles v4 keys)")
    algo, i = body[5], 6
    if algo in (1, 2, 3):               # RSA: n, e
        return _mpi_end(body, i, 2)
    if algo == 16:                      # Elgamal: p, g, y
        return _mpi_end(body, i, 3)
    if algo == 17:                      # DSA: p, q, g, y
        return _mpi_end(body, i, 4)
    if algo in (18, 19, 22):            # ECDH, ECDSA, EdDSA: OID, point [, KDF]
        i = _mpi_end(body, i + 1 + body[i], 1)
        return i + 1 + body[i] if algo == 18 else i
    raise UsageError(f"unsupported OpenPGP public-key algorithm {algo}")


def _packet(tag, body, old=None):
    """A packet: new-format header, or (OLD: the original was old-format) the old format
    with the shortest length, as gpg writes public keys: gpg's own bytes."""
    n = len(body)
    if old is not None and tag < 16:
        lt = 0 if n < 0x100 else 1 if n < 0x10000 else 2
        return bytes([0x80 | tag << 2 | lt]) + n.to_bytes(1 << lt, "big") + body
    if n < 192:
        hdr = bytes([0xC0 | tag, n])
    elif n < 8384:
        hdr = bytes([0xC0 | tag, ((n - 192) >> 8) + 192, (n - 192) & 0xFF])
    else:
        hdr = bytes([0xC0 | tag, 255]) + n.to_bytes(4, "big")
    return hdr + body


def public_part(data):
    """A secret transferable key made public: Secret-Key (5) and Secret-Subkey (7)
    packets cut to their public material, as Public-Key (6) and Public-Subkey (14)."""
    out = []
    for tag, start, b, end in _packets(data):
        if tag in (5, 7):
            body = data[b:end]
            h = data[start]
            old = None if h & 0x40 else h & 3
            out.append(_packet(6 if tag == 5 else 14, body[:_public_len(body)], old))
        else:
            out.append(data[start:end])
    return b"".join(out)


def _crc24(data):
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def armor(data, kind="PUBLIC KEY BLOCK"):
    """DATA in ASCII armour (`-----BEGIN PGP PUBLIC KEY BLOCK-----`, CRC-24 line)."""
    b64 = base64.b64encode(data).decode()
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    crc = base64.b64encode(_crc24(data).to_bytes(3, "big")).decode()
    return (f"-----BEGIN PGP {kind}-----\n\n" + "\n".join(lines) + f"\n={crc}\n"
            f"-----END PGP {kind}-----\n")


def dearmor(text):
    """The binary data of every armoured block in TEXT, joined; UsageError when none."""
    out, body, state = [], [], None
    for raw in text.splitlines():
        line = raw.strip()
        if state is None:
            if line.startswith("-----BEGIN PGP ") and line.endswith("-----"):
                state, body = "headers", []
        elif line.startswith("-----END PGP "):
            try:
                out.append(base64.b64decode("".join(body), validate=True))
            except ValueError:
                raise UsageError("bad ASCII armour (not base64)") from None
            state = None
        elif state == "headers":
            if not line:
                state = "body"
            elif ":" not in line:       # no header lines and no blank line
                state = "body"
                body.append(line)
        elif line.startswith("=") and len(line) == 5:
            pass                        # the CRC-24 line (optional)
        elif line:
            body.append(line)
    if not out:
        raise UsageError("no OpenPGP data (neither binary nor ASCII-armoured keys)")
    return b"".join(out)


def read_keys_file(path):
    """The transferable keys of the file PATH, binary or armoured: [Key] (gpg read
    them). UsageError when it holds none or they do not parse."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    return parse(data, path)


def parse(data, what="input"):
    """[Key] of DATA, binary or armoured."""
    if data[:1] and not data[0] & 0x80:
        data = dearmor(data.decode("utf-8", "replace"))
    keys = [Key(d, sec) for d, sec in split(data)]
    if not keys:
        raise UsageError(f"{what}: no OpenPGP key in it")
    _describe(keys, what)
    return keys


# ------------------------------------------------------------------------ gpg

@contextlib.contextmanager
def gpg_home():
    """A private temporary GnuPG home (0700), removed afterwards, its agent (if one
    started) stopped."""
    d = tempfile.mkdtemp(prefix="hpcimage-gpg-")
    try:
        yield d
    finally:
        if any(n.startswith("S.gpg-agent") for n in os.listdir(d)):
            subprocess.run(["gpgconf", "--homedir", d, "--kill", "gpg-agent"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(d, ignore_errors=True)


def gpg(home, args, input=None, agent=False):
    """Run gpg in HOME (batch, no terminal, C locale); its stdout (bytes).
    HpcimageError (exit 1) with gpg's last line when it fails."""
    argv = ["gpg", "--homedir", home, "--batch", "--no-tty", "--quiet", "--no-options",
            "--no-greeting"]
    if not agent:
        argv.append("--no-autostart")
    env = dict(os.environ, LC_ALL="C", LANGUAGE="")
    env.pop("GPG_AGENT_INFO", None)
    try:
        r = subprocess.run(argv + list(args), input=input, capture_output=True, env=env)
    except FileNotFoundError:
        raise HpcimageError("gpg not found: install GnuPG (Debian: gnupg)") from None
    if r.returncode != 0:
        lines = [x for x in r.stderr.decode("utf-8", "replace").splitlines() if x.strip()]
        raise HpcimageError("gpg: " + (lines[-1].removeprefix("gpg: ") if lines
                                       else f"exit status {r.returncode}"))
    return r.stdout


def _unescape(s):
    """gpg's colon-listing escapes (\\xNN)."""
    if "\\x" not in s:
        return s
    out, i = bytearray(), 0
    while i < len(s):
        if s.startswith("\\x", i) and i + 4 <= len(s):
            out.append(int(s[i + 2:i + 4], 16))
            i += 4
        else:
            out += s[i].encode()
            i += 1
    return out.decode("utf-8", "replace")


def _describe(keys, what):
    """Fill in each Key's fields from `gpg --show-keys --with-colons` (one gpg for all)."""
    with gpg_home() as home:
        try:
            out = gpg(home, ["--with-colons", "--fixed-list-mode", "--show-keys"],
                      input=b"".join(k.data for k in keys)).decode("utf-8", "replace")
        except HpcimageError as e:
            raise UsageError(f"{what}: not a valid OpenPGP key ({e.message})") from None
    found, cur, want_fpr = [], None, False
    for line in out.splitlines():
        f = line.split(":")
        if f[0] in ("pub", "sec"):
            cur = {"bits": int(f[2] or 0), "algo": int(f[3] or 0), "keyid": f[4],
                   "created": int(f[5] or 0) if f[5].isdigit() else 0, "uids": []}
            found.append(cur)
            want_fpr = True
        elif f[0] == "fpr" and want_fpr and cur is not None:
            cur["fpr"], want_fpr = f[9].upper(), False
        elif f[0] in ("sub", "ssb"):
            want_fpr = False
        elif f[0] == "uid" and cur is not None:
            cur["uids"].append(_unescape(f[9]))
    if len(found) != len(keys):
        raise UsageError(f"{what}: gpg read {len(found)} key(s) of {len(keys)}")
    for k, d in zip(keys, found):
        k.fingerprint, k.keyid, k.algo = d.get("fpr", ""), d["keyid"], d["algo"]
        k.bits, k.created, k.uids = d["bits"], d["created"], d["uids"]


# ------------------------------------------------------------------ keyrings

class Keyring:
    """One keyring file (PATH) and its keys; `secret`: a secret keyring. Missing file:
    no keys. `save()` writes it back atomically (0600; 0644 for the global one)."""

    def __init__(self, path, secret=False, mode=0o600):
        self.path, self.secret, self.mode = path, secret, mode
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        except OSError as e:
            raise HpcimageError(f"cannot read the keyring {path}: {e.strerror}") from None
        try:
            self.keys = parse(data, path) if data else []
        except UsageError as e:
            raise HpcimageError(f"the keyring {path} is damaged: {e.message}") from None

    def find(self, fingerprint):
        fp = normalize_fingerprint(fingerprint)
        for k in self.keys:
            if k.fingerprint == fp or len(fp) == 16 and k.keyid.upper() == fp:
                return k
        return None

    def save(self):
        d = os.path.dirname(self.path)
        try:
            if not os.path.isdir(d):
                os.makedirs(d, mode=0o755 if self.mode & 0o044 else 0o700)
            write_atomic(self.path, b"".join(k.data for k in self.keys), self.mode)
        except OSError as e:
            raise HpcimageError(f"cannot write the keyring {self.path}: "
                                f"{e.strerror}") from None


def normalize_fingerprint(s):
    """FINGERPRINT as stored: upper case, no 0x, no blanks."""
    s = "".join(s.split()).upper()
    return s[2:] if s.startswith("0X") else s


def check_fingerprint(s):
    """A key id (16 hex digits) or a fingerprint (40): normalised; UsageError else."""
    fp = normalize_fingerprint(s)
    if len(fp) not in (16, 40) or any(c not in "0123456789ABCDEF" for c in fp):
        raise UsageError(f"{s!r}: give a key id (16 hex digits) or a full fingerprint "
                         "(40 hex digits)")
    return fp


def personal(secret=False, keysdir=None):
    d = keysdir or keys_dir()
    return Keyring(os.path.join(d, SECRET if secret else PUBLIC), secret)


def global_keyring():
    return Keyring(global_public_path(), mode=0o644)


def require_root_for_global(command):
    if os.geteuid() != 0:
        raise UsageError(f"key {command} --global changes {global_public_path()}: "
                         "only root may")


def add_keys(ring, keys):
    """Append KEYS (public, or secret for a secret keyring) that RING lacks; returns the
    ones added. A key already there is kept as it is."""
    added = []
    for k in keys:
        if ring.find(k.fingerprint) is None:
            ring.keys.append(k)
            added.append(k)
    return added


# --------------------------------------------------------------- the commands

def format_key(index, k):
    """Apptainer's listing of one key (sypgp printEntity) and its separator."""
    lines = []
    for uid in k.uids or [""]:
        name, comment, email = split_uid(uid)
        lines.append(f"{index}) U: {name} ({comment}) <{email}>")
    created = time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(k.created))
    lines += [f"   C: {created}", f"   F: {k.fingerprint}", f"   L: {k.bits}",
              "   --------"]
    return "\n".join(lines) + "\n"


def split_uid(uid):
    """'Name (comment) <email>' -> (name, comment, email)."""
    name, comment, email = uid, "", ""
    if name.endswith(">") and "<" in name:
        name, _, email = name[:-1].rpartition("<")
        name = name.rstrip()
    if name.endswith(")") and "(" in name:
        name, _, comment = name[:-1].rpartition("(")
        name = name.rstrip()
    return name, comment, email


def list_text(secret=False, use_global=False, keysdir=None):
    """`key list`: Apptainer's text."""
    if use_global:
        if secret:
            raise UsageError("the global keyring holds no secret keys")
        ring = global_keyring()
        head = "Public key listing"
    else:
        ring = personal(secret, keysdir)
        head = "Private key listing" if secret else "Public key listing"
    out = [f"{head} ({ring.path}):\n\n"]
    out += [format_key(i, k) for i, k in enumerate(ring.keys)]
    return "".join(out)


def import_file(path, use_global=False, keysdir=None):
    """`key import FILE`: its secret keys into the secret keyring, every key's public
    part into the public keyring (the global one with --global: public keys only).
    Returns the lines to print. A key already there: UsageError (Apptainer's), and
    nothing is written: every check comes before the first write."""
    keys = read_keys_file(path)
    pub = global_keyring() if use_global else personal(False, keysdir)
    secrets = [k for k in keys if k.secret]
    if secrets and use_global:
        raise UsageError("the global keyring holds public keys only: "
                         f"{path} holds a secret key")
    sec = personal(True, keysdir) if secrets else None
    lines = []
    for k in secrets:
        if sec.find(k.fingerprint):
            raise UsageError(f"the key with fingerprint {k.fingerprint} already "
                             "belongs to the keyring")
        sec.keys.append(k)
        lines.append(f"Key with fingerprint {k.fingerprint} successfully added to "
                     "the private keyring")
    for k in keys:
        if pub.find(k.fingerprint):
            if k.secret:
                continue            # its secret half was new: the public one stays
            raise UsageError(f"the key with fingerprint {k.fingerprint} already "
                             "belongs to the keyring")
        pub.keys.append(k.public())
        lines.append(f"Key with fingerprint {k.fingerprint} successfully added to the "
                     "public keyring")
    if sec is not None:
        sec.save()
    pub.save()
    return lines


def export_key(fingerprint, out, secret=False, armored=False, use_global=False,
               keysdir=None):
    """`key export`: the key FINGERPRINT of the (secret) keyring into the file OUT
    (binary, or ASCII-armoured), atomically. Returns the line to print."""
    if use_global and secret:
        raise UsageError("the global keyring holds no secret keys")
    ring = global_keyring() if use_global else personal(secret, keysdir)
    k = ring.find(fingerprint)
    if k is None:
        raise UsageError(f"no key with fingerprint {normalize_fingerprint(fingerprint)} "
                         f"in {ring.path}")
    data = k.data
    if armored:
        data = armor(data, "PRIVATE KEY BLOCK" if secret else "PUBLIC KEY BLOCK")
    try:
        write_atomic(out, data, 0o600 if secret else 0o644)
    except OSError as e:
        raise HpcimageError(f"cannot write {out}: {e.strerror}") from None
    what = "Private" if secret else "Public"
    return f"{what} key with fingerprint {k.fingerprint} correctly exported to file: {out}"


def remove_key(fingerprint, public=True, private=False, use_global=False, keysdir=None):
    """`key remove`: the key from the public keyring, the secret one, or both. A key in
    none of the chosen keyrings: UsageError."""
    fp = check_fingerprint(fingerprint)
    rings = []
    if public:
        rings.append(global_keyring() if use_global else personal(False, keysdir))
    if private:
        if use_global:
            raise UsageError("the global keyring holds no secret keys")
        rings.append(personal(True, keysdir))
    hit = False
    for ring in rings:
        k = ring.find(fp)
        if k is not None:
            ring.keys.remove(k)
            ring.save()
            hit = True
    if not hit:
        where = " or ".join(r.path for r in rings)
        raise UsageError(f"no key matching fingerprint {fp} in {where}")


def check_bits(bits):
    if not 1024 <= bits <= 4096:
        raise UsageError(f"--bit-length {bits}: RSA keys of 1024 to 4096 bits")


def check_newpair(name, email, comment, bits):
    """`key newpair`'s input checks (UsageError), all before any progress line."""
    check_bits(bits)
    for what, v in (("name", name), ("email", email), ("comment", comment)):
        if any(c in v for c in "()<>\n\r\0"):
            raise UsageError(f"the key's {what} may not contain ( ) < > or a line break")
    if not (name or email):
        raise UsageError("a key needs a name (-N) or an email address (-E)")


def newpair(name, email, comment, password, bits=4096, keysdir=None):
    """`key newpair`: an RSA key pair (a signing primary key and an encryption subkey,
    as Apptainer's) made by gpg in a private home, appended to the personal keyrings.
    Returns the public Key."""
    check_newpair(name, email, comment, bits)
    params = ["Key-Type: RSA", f"Key-Length: {bits}", "Key-Usage: sign,cert",
              "Subkey-Type: RSA", f"Subkey-Length: {bits}", "Subkey-Usage: encrypt",
              "Expire-Date: 0"]
    params += [f"Name-Real: {name}"] if name else []
    params += [f"Name-Email: {email}"] if email else []
    params += [f"Name-Comment: {comment}"] if comment else []
    params += [f"Passphrase: {password}"] if password else ["%no-protection"]
    params.append("%commit")
    loop = ["--pinentry-mode", "loopback"]
    with gpg_home() as home:
        gpg(home, loop + ["--gen-key", "-"],
            input=("\n".join(params) + "\n").encode(), agent=True)
        pub_data = gpg(home, ["--export"], agent=True)
        pw = ["--passphrase-fd", "0"] if password else []
        sec_data = gpg(home, loop + pw + ["--export-secret-keys"],
                       input=(password + "\n").encode() if password else None,
                       agent=True)
    pk, sk = parse(pub_data, "the new key")[0], parse(sec_data, "the new key")[0]
    sec, pub = personal(True, keysdir), personal(False, keysdir)
    add_keys(sec, [sk])
    add_keys(pub, [pk])
    sec.save()
    pub.save()
    return pk


def keysdir_or_none(value):
    """--keysdir as given (None: the default)."""
    return os.path.abspath(os.path.expanduser(value)) if value else None
