import sys

from migrated.cli import main

sys.exit(main())
