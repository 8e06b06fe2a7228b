import sys

from fedflock.cli import main

sys.exit(main())
