#!/usr/bin/env python
"""Entry point: `python run.py shapes`, `python run.py cub --data PATH`, `python run.py --help`."""
from minseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
