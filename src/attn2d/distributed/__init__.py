"""Process grid, counted communication and process-group set-up."""
from attn2d.distributed.comm import CommStats, count_comm
from attn2d.distributed.grid import GridError, ProcessGrid, check_grid, check_seq_len, parse_grid
from attn2d.distributed.health import CollectiveError
from attn2d.distributed.setup import DistInfo, destroy_distributed, init_distributed

__all__ = [
    "CollectiveError",
    "CommStats",
    "count_comm",
    "GridError",
    "ProcessGrid",
    "check_grid",
    "check_seq_len",
    "parse_grid",
    "DistInfo",
    "init_distributed",
    "destroy_distributed",
]
