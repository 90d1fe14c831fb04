"""Distributed entry point for layer probing: `deepspeed launch/probe.py --model DIR --data PATH --output FILE`.

Same arguments as `adept-ds probe`; the DeepSpeed launcher (or torchrun) supplies rank and world size.
"""

import sys

from adept_ds.cli import main

if __name__ == "__main__":
    sys.exit(main(["probe", *sys.argv[1:]]))
