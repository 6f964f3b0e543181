"""Run at the start of every Python process the tests start (conftest puts this directory first on their
PYTHONPATH): in those processes `import torch` fails, as it does where bigjax is installed for training.

bigjax never imports torch; tensorboardX (bigjax's TensorBoard writer) imports it whenever it is installed, and the
test environment has it for transformers (tests/test_hf*.py, in the pytest processes themselves, which this does not
touch). That import was ~1.5 s of CPU in each of the suite's ~150 bigjax processes.
"""

import importlib.machinery
import importlib.util
import os
import sys

sys.modules.setdefault("torch", None)  # `import torch` raises ImportError

# Then the sitecustomize that would have run without this one (the interpreter's own, or one elsewhere on the path).
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
)
if _spec is not None:
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    _spec.loader.exec_module(_module)
