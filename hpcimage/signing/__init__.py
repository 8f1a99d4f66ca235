"""Signed SIF images: the signed metadata (sifsig), verify, sign, the keyrings' places
(keyring). Above image/, below store/ (docs/architecture.md); never on the hot path:
gpg/gpgv run as processes, `cryptography` is imported inside the functions that need it."""
