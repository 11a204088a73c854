import sys

from bench.continual.cli import main

sys.exit(main())
