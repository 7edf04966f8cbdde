import sys

from uniportrait.cli import main

sys.exit(main())
