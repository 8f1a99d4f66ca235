"""A small HKP key server for the tests (draft-shaw-openpgp-hkp), not part of the
product: stdlib http.server on 127.0.0.1 and a free port, keys stored in a directory.

    GET  /pks/lookup?op=get&search=0xFPR|0xKEYID        the armoured key (404: none)
    GET  /pks/lookup?op=index&options=mr&search=TEXT    info:1:N / pub:... / uid:... (404)
    POST /pks/add  keytext=ARMOURED                     what gpg --show-keys reads

    with KeyServer(tmpdir) as ks: ks.url ...
"""
import http.server
import json
import os
import subprocess
import tempfile
import threading
import urllib.parse


def _show(armored):
    """[{fpr, algo, bits, created, uids}] of the keys in ARMORED (gpg --show-keys)."""
    with tempfile.TemporaryDirectory() as home:
        r = subprocess.run(["gpg", "--homedir", home, "--batch", "--no-autostart",
                            "--with-colons", "--fixed-list-mode", "--show-keys"],
                           input=armored.encode(), capture_output=True)
    if r.returncode != 0:
        return []
    keys, want = [], False
    for line in r.stdout.decode().splitlines():
        f = line.split(":")
        if f[0] == "pub":
            keys.append({"algo": f[3], "bits": f[2], "created": f[5], "uids": []})
            want = True
        elif f[0] == "fpr" and want:
            keys[-1]["fpr"], want = f[9].upper(), False
        elif f[0] == "sub":
            want = False
        elif f[0] == "uid" and keys:
            keys[-1]["uids"].append(f[9])
    return keys


class KeyServer:
    def __init__(self, directory):
        self.dir = str(directory)
        os.makedirs(self.dir, exist_ok=True)
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body=b"", ctype="text/plain"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                u = urllib.parse.urlsplit(self.path)
                q = dict(urllib.parse.parse_qsl(u.query))
                server.requests.append(("GET", u.path, q))
                if u.path != "/pks/lookup":
                    return self._send(404, b"not found")
                hits = server.find(q.get("search", ""))
                if not hits:
                    return self._send(404, b"No results found")
                if q.get("op") == "get":
                    return self._send(200, "".join(h["text"] for h in hits).encode(),
                                      "application/pgp-keys")
                if q.get("op") == "index":
                    lines = [f"info:1:{len(hits)}"]
                    for h in hits:
                        lines.append(f"pub:{h['fpr']}:{h['algo']}:{h['bits']}:"
                                     f"{h['created']}::")
                        lines += [f"uid:{urllib.parse.quote(uid)}:{h['created']}::"
                                  for uid in h["uids"]]
                    return self._send(200, ("\n".join(lines) + "\n").encode())
                return self._send(501, b"not implemented")

            def do_POST(self):
                u = urllib.parse.urlsplit(self.path)
                n = int(self.headers.get("Content-Length", 0))
                form = dict(urllib.parse.parse_qsl(self.rfile.read(n).decode()))
                server.requests.append(("POST", u.path, form))
                if u.path != "/pks/add" or "keytext" not in form:
                    return self._send(400, b"bad request")
                keys = _show(form["keytext"])
                if len(keys) != 1 or "PRIVATE KEY" in form["keytext"]:
                    return self._send(422, b"one public key expected")
                k = dict(keys[0], text=form["keytext"])
                with open(os.path.join(server.dir, k["fpr"] + ".json"), "w") as f:
                    json.dump(k, f)
                return self._send(200, b"key added")

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def keys(self):
        out = []
        for name in sorted(os.listdir(self.dir)):
            with open(os.path.join(self.dir, name)) as f:
                out.append(json.load(f))
        return out

    def find(self, search):
        s = search.upper()
        hexid = s[2:] if s.startswith("0X") else None
        hits = []
        for k in self.keys():
            if hexid is not None:
                if hexid and k["fpr"].endswith(hexid):
                    hits.append(k)
            elif any(search.lower() in urllib.parse.unquote(u).lower() for u in k["uids"]):
                hits.append(k)
        return hits

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        return False
