"""Environment variables torch.distributed, TorchRec and Lightning read to place a process. A test
that sets them restores them (``single_rank_group`` in conftest.py) and the job runners never
pass them on to the ranks they start, so no test depends on which tests ran before it."""

DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
            "GROUP_RANK", "NODE_RANK")
