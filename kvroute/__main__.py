"""``python -m kvroute``: the same command line as the ``kvroute`` script."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="kvroute")
