"""Only the C extension lives here; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "consumer._avrofast",
            ["consumer/_avrofast.c"],
            extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
        )
    ]
)
