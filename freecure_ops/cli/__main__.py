"""``python -m freecure_ops.cli ...`` (what ``accelerate launch`` and ``torchrun`` run): the same as ``freecure``."""
import sys

from . import main

sys.exit(main())
