"""`python -m minseg ...` is the same as `python run.py ...`."""
from minseg.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
