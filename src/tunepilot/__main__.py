import sys

from tunepilot.cli import main

# guarded: a spawned worker (the probe's) imports this module again when run as -m tunepilot
if __name__ == "__main__":
    sys.exit(main())
