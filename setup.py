"""Only the C extension lives here; everything else is in pyproject.toml.

The extension is the decoder's fast path and optional: where no C compiler works (or with
USAGE_CONSUMER_BUILD_C=0) the package installs without it and fastavro decodes every
message, which the consumer logs at start (consumer/app.py, build_decoder)."""

import os

from setuptools import Extension, setup

FAST = Extension(
    "consumer.decode._avrofast",
    ["consumer/decode/_avrofast.c"],
    extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
    optional=True,  # a failed compile warns and installs the rest
)

setup(ext_modules=[] if os.environ.get("USAGE_CONSUMER_BUILD_C") == "0" else [FAST])
