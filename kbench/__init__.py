"""kbench: which pretrained backbone or ensemble to fine-tune, and what each costs to train and serve.

Importing kbench never imports keras: the backend is chosen first (see ``kbench.core.backend``).
"""

from kbench.core.errors import KbenchError
from kbench.core.version import __version__

__all__ = ["KbenchError", "__version__"]
