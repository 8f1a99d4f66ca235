"""hpcimage: container images as environment modules, with an unprivileged runtime.

This package's __init__ stays empty of imports: `image-exec` imports
`hpcimage.runtime` on every call and must not pay for anything else.
"""

__version__ = "0.2.0"
