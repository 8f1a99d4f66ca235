"""Signed images: keyrings and keys (keyring), the HKP key-server client (hkp), and
signing and verifying SIF images. Off the hot path: the runtime never imports it."""
