"""``python -m msif.plan`` is not the way in: the command is ``msif plan``."""

import sys

sys.exit("use `msif plan`")
