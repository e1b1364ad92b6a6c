"""``python -m meshnet_lesion.cli`` (and ``torchrun -m meshnet_lesion.cli train``)."""
import sys

from . import main

sys.exit(main())
