import sys

from tunepilot.cli import main

# guarded: importing this module (multiprocessing's spawn does, for -m tunepilot) never runs the CLI
if __name__ == "__main__":
    sys.exit(main())
