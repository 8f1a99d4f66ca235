"""The HKP key-server client (draft-shaw-openpgp-hkp): `hpcimage key push|search|pull`.

    GET  /pks/lookup?op=get&options=mr&search=0xFINGERPRINT   the armoured key
    GET  /pks/lookup?op=index&options=mr&search=TEXT           the machine-readable index
    POST /pks/add   (form: keytext=ARMOURED KEY)

The server: -u/--url, else $HPCIMAGE_KEYSERVER; `hkp://host` is http on port 11371,
`hkps://host` https. Errors are one line: no such key (exit 2), a server that does
not answer or fails (exit 1).
"""
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from hpcimage.errors import HpcimageError, UsageError

TIMEOUT = 30
ALGORITHMS = {1: "RSA", 2: "RSA", 3: "RSA", 16: "Elgamal", 17: "DSA",
              18: "Elliptic Curve", 19: "ECDSA", 20: "Reserved", 21: "Diffie-Hellman"}


def server_url(url=None, environ=None):
    """The key server's base URL: URL (-u), else $HPCIMAGE_KEYSERVER."""
    env = os.environ if environ is None else environ
    url = url or env.get("HPCIMAGE_KEYSERVER")
    if not url:
        raise UsageError("no key server: give -u/--url URL or set HPCIMAGE_KEYSERVER")
    p = urllib.parse.urlsplit(url if "://" in url else "https://" + url)
    scheme, netloc = p.scheme, p.netloc
    if scheme == "hkp":
        scheme, netloc = "http", netloc if p.port else netloc + ":11371"
    elif scheme == "hkps":
        scheme = "https"
    if scheme not in ("http", "https") or not p.hostname:
        raise UsageError(f"{url}: not a key server URL (http://, https://, hkp://, hkps://)")
    return f"{scheme}://{netloc}{p.path.rstrip('/')}"


def _request(base, path, data=None):
    req = urllib.request.Request(base + path, data=data,
                                 headers={"User-Agent": "hpcimage"})
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
            return r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise HpcimageError(f"key server {base}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        reason = getattr(reason, "strerror", None) or str(reason)
        raise HpcimageError(f"key server {base} did not answer: {reason}") from None


def fetch(fingerprint, url=None):
    """The armoured key FINGERPRINT (8 or 40 hex digits, as Apptainer) from the server."""
    fp = fingerprint.upper().removeprefix("0X")
    if len(fp) not in (8, 40) or any(c not in "0123456789ABCDEF" for c in fp):
        raise UsageError(f"{fingerprint!r}: give a key id of 8 hex digits or a full "
                         "fingerprint of 40")
    base = server_url(url)
    q = urllib.parse.urlencode({"op": "get", "options": "mr", "search": "0x" + fp})
    text = _request(base, "/pks/lookup?" + q)
    if text is None or "-----BEGIN PGP PUBLIC KEY BLOCK-----" not in text:
        raise UsageError(f"no matching keys found for fingerprint {fp} on {base}")
    return text


def index(search, url=None):
    """The machine-readable index for SEARCH (8+ hex digits: a key id, searched as 0x...);
    None when nothing matches."""
    if len(search) >= 8 and all(c in "0123456789ABCDEF" for c in search):
        search = "0x" + search
    base = server_url(url)
    q = urllib.parse.urlencode({"op": "index", "options": "mr", "search": search})
    return _request(base, "/pks/lookup?" + q)


def add(armored, url=None):
    """Send the armoured public key to the server (/pks/add)."""
    base = server_url(url)
    _request(base, "/pks/add", urllib.parse.urlencode({"keytext": armored}).encode())


def _date(s):
    if s == "":
        return "[ultimate]"
    if s == "none":
        return s
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %z %Z", time.localtime(int(s)))
    except (ValueError, OverflowError):
        return s


def _tabwrite(lines):
    """Go's text/tabwriter (padding 2, blanks) for cells separated by tabs: columns are
    aligned within each run of lines that has them; an empty line ends the run."""
    out, block = [], []

    def flush():
        ncol = max((len(r) - 1 for r in block), default=0)
        widths = [max((len(r[c]) for r in block if len(r) - 1 > c), default=0) + 2
                  for c in range(ncol)]
        for r in block:
            out.append("".join(cell.ljust(widths[c]) for c, cell in enumerate(r[:-1]))
                       + r[-1])
        block.clear()

    for line in lines:
        if line == "":
            flush()
            out.append("")
        else:
            block.append(line.split("\t"))
    flush()
    return "\n".join(out) + "\n"


def format_index(text, long=False):
    """Apptainer's `key search` table from the machine-readable index (sypgp
    formatMROutput): (count, text). A count that disagrees with the info line:
    HpcimageError."""
    lines, cur, count, expect, got_name = [], None, 0, 0, False
    head = (["FINGERPRINT", "ALGORITHM", "BITS", "CREATION DATE", "EXPIRATION DATE",
             "STATUS"] if long else ["KEY ID", "BITS"])
    cur = "\t".join(head) + "\t"
    first = True
    for raw in text.splitlines():
        f = (raw.strip() + ":" * 7).split(":")
        if f[0] == "info":
            try:
                expect = int(f[2])
            except ValueError:
                raise HpcimageError("the key server's index is malformed") from None
        elif f[0] == "pub":
            if not first:
                if not got_name:
                    lines.append(cur.rstrip("\t"))
                lines.append("")
            first, got_name = False, False
            fpr, bits = f[1], f[3]
            if long:
                try:
                    algo = ALGORITHMS.get(int(f[2]), "unknown")
                except ValueError:
                    raise HpcimageError("the key server's index is malformed") from None
                flags = f[6]
                status = ("[revoked]" if "r" in flags else "[disabled]" if "d" in flags
                          else "[expired]" if "e" in flags else "[enabled]")
                cells = [fpr, algo, bits, _date(f[4]) if f[4] else "",
                         _date(f[5]) if f[5] else "", status]
            else:
                cells = [fpr[-8:], bits]
            cur = "\t".join(cells) + "\t"
            count += 1
        elif f[0] == "uid":
            name = urllib.parse.unquote(f[1])
            if got_name:
                cur = "\t" * (6 if long else 2)
            got_name = True
            lines.append(cur + name)
    if first:
        lines.insert(0, cur + "NAME/EMAIL")
    else:
        lines.insert(0, "\t".join(head) + "\tNAME/EMAIL")
        if not got_name:
            lines.append(cur.rstrip("\t"))
    if expect and count != expect:
        raise HpcimageError("the key server's index lists "
                            f"{count} key(s) where it announces {expect}")
    return count, _tabwrite(lines)
