import sys

from tunepilot.cli import main

sys.exit(main())
