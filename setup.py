"""Builds the optional C extension of the float-entropy codec; pyproject.toml holds the metadata.

``optional=True``: a machine without a C compiler still installs shardstore, and the
codec falls back to its numpy implementation (same byte format, slower).
"""

from setuptools import Extension, setup  # type: ignore[import-untyped]

setup(
    ext_modules=[
        Extension(
            "shardstore.codecs._entropy",
            sources=["shardstore/codecs/_entropy.c"],
            # Portable flags only: wheels and CI machines may differ from the build host.
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        )
    ]
)
