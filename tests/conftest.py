import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see msif/__init__.py)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
