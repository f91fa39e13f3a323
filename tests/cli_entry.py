"""``cli.py`` for a test launched with torchrun: runs ``cli.main`` on the command line, then says whether
this rank left its process group behind (cli.end_process_group)."""

import os
import sys

import torch

import cli

if __name__ == "__main__":
    cli.main(sys.argv[1:])
    print(f"rank {os.environ['RANK']} exits with its process group destroyed: {not torch.distributed.is_initialized()}")
