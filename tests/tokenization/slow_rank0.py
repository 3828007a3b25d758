"""Run tokenization.image_tokenize under torchrun with rank 0 slow to load its VQGAN.

Rank 0 checks the output folder and starts its manifest; on a busy machine the other ranks can be
ahead of it. This makes that order certain, so a test can show the ranks wait for rank 0's check."""

import os
import sys
import time

from medmax import image_tokenizing
from tokenization import image_tokenize

_setup_model = image_tokenizing._setup_model


def _slow_setup_model(*args, **kwargs):
    if os.environ.get("RANK") == "0":
        time.sleep(float(os.environ.get("SLOW_RANK0_SECONDS", "3")))
    return _setup_model(*args, **kwargs)


image_tokenizing._setup_model = _slow_setup_model

if __name__ == "__main__":
    sys.exit(image_tokenize.main())
