import sys

from sgdlens.cli import main

sys.exit(main())
