"""``python -m uniportrait.training`` = ``uniportrait train`` (for ``accelerate launch -m``)."""

import sys

from uniportrait.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
