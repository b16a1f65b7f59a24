"""Run under ``torch.distributed.run --nproc-per-node 2``: rank 1 stalls, rank 0 must name it.

Rank 1 sleeps past ``--dist-timeout`` before the step's all-reduce; rank 0 waits in it. Each rank
prints ``RESULT <rank> <message>`` and exits 2 on the expected error, 0 if the collective passed.
"""

import os
import sys
import time


from altpo.errors import UserError
from altpo.train.distributed import Distributed
from altpo.train.step import StepStats

timeout = float(sys.argv[1])
dist = Distributed.setup("cpu", timeout_s=timeout)
stats = StepStats(1.0, 0.5, 0.5, 0.0, -1.0, -1.0, 1, 10, 2, 1)
if dist.rank == 1:
    time.sleep(3 * timeout)
try:
    dist.sum_stats(stats, False)
except UserError as err:
    print(f"RESULT {dist.rank} {err}", flush=True)
    os._exit(2)  # the peer is gone: skip the process group's teardown
print(f"RESULT {dist.rank} passed", flush=True)
os._exit(0)
