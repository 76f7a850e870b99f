"""``python -m consumer.local.emulator --port 12111``: run the emulator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from consumer.local.emulator.args import add_arguments, to_options
from consumer.local.emulator.server import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m consumer.local.emulator")
    add_arguments(parser)
    args = parser.parse_args()
    main(args.host, args.port, to_options(args))
