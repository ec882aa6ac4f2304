"""Deprecated path kept by restructure.py: ``rendezvous.torchrun_plugin`` is now ``rendezvous.torchrun.plugin`` (issue 27).

Kept for the ``torchrun.handlers`` entry point of installs made before the move;
import ``rendezvous.torchrun.plugin`` instead. Reinstalling the package points entry points at the new path.
"""

import warnings

from rendezvous.torchrun.plugin import *  # noqa: F403
from rendezvous.torchrun.plugin import __all__  # noqa: F401

warnings.warn("rendezvous.torchrun_plugin is deprecated: import rendezvous.torchrun.plugin", DeprecationWarning, stacklevel=2)
