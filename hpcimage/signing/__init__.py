"""Signed images: the signed metadata (sifsig), verify, sign, the site's verdict (trust),
keyrings and keys (keyring), the HKP key-server client (hkp). Above runtime/, below
store/ (docs/architecture.md); never on the hot path: gpg/gpgv run as processes,
`cryptography` is imported inside the functions that need it."""
