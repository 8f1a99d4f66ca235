"""The signed metadata of a SIF signature, byte for byte as sylabs/sif's pkg/integrity
computes it (checked against every signature of the conformance corpus).

    {"version":1,"header":{"digest":"sha256:HEX"},
     "objects":[{"relativeId":N,"descriptorDigest":"sha256:HEX","objectDigest":"sha256:HEX"},...]}

- header digest: launch script, magic, version and UUID (the stable fields only);
- descriptor digest: data type (int32), used (bool), the ID relative to the group's lowest
  object ID (uint32), linked ID (uint32), size, created, uid, gid (int64), name [128],
  extra [384], little-endian: not the offset, padded size, modification time or group;
- object digest: the object's bytes.
Standard library only.
"""
import hashlib
import json
import struct

from hpcimage.errors import UsageError
from hpcimage.image import sif

METADATA_VERSION = 1
_DESC_FIELDS = struct.Struct("<i?II4q")
HASHES = {"sha224": hashlib.sha224, "sha256": hashlib.sha256, "sha384": hashlib.sha384,
          "sha512": hashlib.sha512}
# SIF descriptor hash codes (Go's crypto.Hash order as sif stores it) -> hashlib names.
HASH_CODES = {1: "sha256", 2: "sha384", 3: "sha512"}
CODE_OF_HASH = {v: k for k, v in HASH_CODES.items()}


def header_bytes(img):
    h = img.header
    return h.launch_script + h.magic + h.version + h.id


def descriptor_bytes(d, relative_id):
    return _DESC_FIELDS.pack(d.data_type, d.used, relative_id, d.raw_linked_id, d.size,
                             d.created_at, d.uid, d.gid) + d.raw_name + d.extra


def object_digest(img, d, hash_name="sha256"):
    h = HASHES[hash_name]()
    img.copy_object(d.id, h.update, chunk_size=8 << 20)
    return h.digest()


def group_objects(img, group_id):
    """The descriptors of object group GROUP_ID, by ID; UsageError if there are none."""
    ods = sorted((d for d in img.descriptors if d.group_id == group_id), key=lambda d: d.id)
    if not ods:
        raise UsageError(f"integrity: group not found: {group_id}")
    return ods


def group_ids(img):
    """The object groups of IMG, sorted."""
    return sorted({d.group_id for d in img.descriptors if d.group_id})


def group_min_id(img, group_id):
    return min(d.id for d in group_objects(img, group_id))


def _dig(name, value):
    return f"{name}:{value.hex()}"


def image_metadata(img, group_id, ods, hash_name="sha256"):
    """The compact JSON (bytes) a signature over objects ODS of group GROUP_ID signs."""
    min_id = group_min_id(img, group_id)
    hf = HASHES[hash_name]
    objects = []
    for d in sorted(ods, key=lambda d: d.id):
        rel = d.id - min_id
        objects.append({"relativeId": rel,
                        "descriptorDigest": _dig(hash_name, hf(descriptor_bytes(d, rel)).digest()),
                        "objectDigest": _dig(hash_name, object_digest(img, d, hash_name))})
    md = {"version": METADATA_VERSION,
          "header": {"digest": _dig(hash_name, hf(header_bytes(img)).digest())},
          "objects": objects or None}
    return json.dumps(md, separators=(",", ":")).encode()


class IntegrityError(Exception):
    """What a check of the metadata found: the message is the reference's."""


def _parse_digest(s):
    try:
        name, value = s.split(":")
        raw = bytes.fromhex(value)
    except (AttributeError, ValueError):
        raise IntegrityError("digest malformed") from None
    if name not in HASHES:
        raise IntegrityError("hash algorithm unsupported")
    if len(raw) != HASHES[name]().digest_size:
        raise IntegrityError("digest malformed")
    return name, raw


def parse_metadata(data):
    """The signed JSON -> (header digest, {relative id: (descriptor digest, object digest)})."""
    try:
        md = json.loads(data)
        if md.get("version") != METADATA_VERSION:
            raise IntegrityError(f"unsupported metadata version {md.get('version')!r}")
        header = _parse_digest(md["header"]["digest"])
        objects = {}
        for o in md.get("objects") or ():
            objects[int(o["relativeId"])] = (_parse_digest(o["descriptorDigest"]),
                                             _parse_digest(o["objectDigest"]))
    except (ValueError, TypeError, KeyError, AttributeError):
        raise IntegrityError("signed metadata malformed") from None
    return header, objects


def check_metadata(img, group_id, ods, data, subset_ok):
    """Check the signed JSON DATA against IMG for objects ODS of GROUP_ID: the IDs of the
    objects verified, in order, and the IntegrityError (or None) that stopped it."""
    header, objects = parse_metadata(data)
    min_id = group_min_id(img, group_id)
    absolute = {min_id + rel: v for rel, v in objects.items()}
    if not subset_ok:
        ids = {d.id for d in ods}
        for d in ods:
            if d.id not in absolute:
                return [], IntegrityError(f"object {d.id}: object not signed")
        for i in sorted(absolute):
            if i not in ids:
                return [], IntegrityError(f"object {i}: signed object not found")
    name, value = header
    if HASHES[name](header_bytes(img)).digest() != value:
        return [], IntegrityError("header integrity compromised")
    verified = []
    for d in ods:
        if d.id not in absolute:
            return verified, IntegrityError(f"object {d.id}: object not signed")
        (dn, dv), (on, ov) = absolute[d.id]
        if HASHES[dn](descriptor_bytes(d, d.id - min_id)).digest() != dv:
            return verified, IntegrityError(
                f"data object descriptor integrity compromised: {d.id}")
        if object_digest(img, d, on) != ov:
            return verified, IntegrityError(f"data object integrity compromised: {d.id}")
        verified.append(d.id)
    return verified, None
