import os
import sys
import tempfile

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# cached pretrained bases (digits) go to a per-session temporary directory, never the user's cache
os.environ.setdefault("LORABENCH_CACHE", tempfile.mkdtemp(prefix="lorabench-cache-"))
sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and pytest-xdist already runs one worker per core.
torch.set_num_threads(1)
