"""`python -m mapo.eval`: see `mapo.eval.cli`."""

import sys

from mapo.eval.cli import main

sys.exit(main())
