"""Builds the optional C extensions (float-entropy coding, the intN clipping search, the mapped-input guard).

pyproject.toml has the metadata.

``optional=True``: a machine without a C compiler still installs shardstore, and the
codecs fall back to their numpy implementations (same bytes, slower).
"""

from setuptools import Extension, setup  # type: ignore[import-untyped]

setup(
    ext_modules=[
        Extension(
            "shardstore.codecs._entropy",
            sources=["shardstore/codecs/_entropy.c"],
            depends=["shardstore/codecs/_entropy_rans.h"],  # included twice (AVX2, AVX-512)
            # Portable flags only: wheels and CI machines may differ from the build host.
            extra_compile_args=["-O3", "-std=c99"],
            optional=True,
        ),
        Extension(
            "shardstore.codecs._quantize",
            sources=["shardstore/codecs/_quantize.c"],
            # ISO C and no FMA contraction: every float32 operation rounds as numpy's does;
            # -fno-trapping-math only lets the loop use blends (no value changes).
            extra_compile_args=["-O3", "-std=c99", "-ffp-contract=off", "-fno-trapping-math"],
            optional=True,
        ),
        Extension(
            # A SIGBUS handler for push's mapped inputs (POSIX): without it, a file truncated under a
            # push still kills the process with "Bus error", as it did before.
            "shardstore.repo._mapguard",
            sources=["shardstore/repo/_mapguard.c"],
            extra_compile_args=["-O2"],
            optional=True,
        ),
    ]
)
