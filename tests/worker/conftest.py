"""Worker tests: the task body in-process against real Redis (DB 15) and the real pipeline."""

from __future__ import annotations

import torch

# The pipeline runs in this process: one torch thread avoids oversubscription on a small, shared CPU.
torch.set_num_threads(1)

