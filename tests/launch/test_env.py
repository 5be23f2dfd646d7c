import pytest

from launch.env import DistEnv, discover

# Recorded from `torchrun --nnodes 1 --nproc_per_node 2` (rank 1), trimmed to the variables read.
TORCHRUN_RANK1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "GROUP_RANK": "0",
                  "TORCHELASTIC_RUN_ID": "none"}


def test_torchrun_environment():
    env = discover(TORCHRUN_RANK1)
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=29511,
                          launcher="torchrun")


def test_no_launcher_means_one_process():
    assert discover({}) == DistEnv()


def test_malformed_environment_is_reported():
    with pytest.raises(RuntimeError, match="malformed torchrun environment"):
        discover({**TORCHRUN_RANK1, "RANK": "one"})
