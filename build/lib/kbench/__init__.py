"""kbench: which pretrained backbone or ensemble to fine-tune, and what each costs to train and serve.

Importing kbench never imports keras: the backend is chosen first (see ``kbench.backend``).
"""

from kbench.errors import KbenchError

__version__ = "0.1.0"
__all__ = ["KbenchError", "__version__"]
