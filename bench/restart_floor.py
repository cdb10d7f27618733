"""The floor of a 2-rank start (bench/restart.py): a torchrun worker that imports torch and passes one gloo barrier.

Rank 0 writes the wall-clock time just after the barrier to the file named by its argument: what no start of
prefix.train can go below on this machine (torchrun, two interpreters, torch, the rendezvous). The workers then
stay a second, so that the benchmark can read their CPU time at that moment.
"""

import os
import sys
import time

import torch.distributed as dist

dist.init_process_group("gloo")
dist.barrier()
if dist.get_rank() == 0:
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{time.time()}\n")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])  # whole when it appears
time.sleep(1)
dist.destroy_process_group()
