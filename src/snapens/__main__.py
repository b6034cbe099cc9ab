import sys

from snapens.cli import main

sys.exit(main())
