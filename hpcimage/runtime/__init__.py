"""The container runtime: the hot path of every image-* wrapper.

Standard library only (plus hpcimage.image, hpcimage.host): no click, jinja2, yaml,
psutil here. Entry point: `python -I -m hpcimage.runtime VERB [OPTIONS] ...`.
"""
