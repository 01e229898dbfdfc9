"""`python -m pkm ...` = the `pkm` console script (what torchrun, srun and deepspeed launch)."""

import sys

from pkm.cli import main

sys.exit(main())
