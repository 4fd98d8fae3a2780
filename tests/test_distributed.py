"""Rank and rendezvous discovery from torchrun, srun, or neither."""

import pytest

from megatron_dvpo.distributed import launch_env

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
               "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_torchrun_env(clean_env):
    for key, value in dict(RANK="5", WORLD_SIZE="16", LOCAL_RANK="5", MASTER_ADDR="node1",
                           MASTER_PORT="6000", SLURM_PROCID="1", SLURM_NTASKS="2").items():
        clean_env.setenv(key, value)
    env = launch_env()  # torchrun inside an sbatch job: torchrun's variables win
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == \
        (5, 16, 5, "node1", 6000)


def test_srun_env(clean_env):
    for key, value in dict(SLURM_PROCID="3", SLURM_NTASKS="8", SLURM_LOCALID="1",
                           MASTER_ADDR="node7", MASTER_PORT="29400").items():
        clean_env.setenv(key, value)
    env = launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (3, 8, 1, "node7")


def test_srun_without_master_addr_says_what_to_export(clean_env):
    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):
        launch_env()


def test_plain_process_is_a_world_of_one(clean_env):
    env = launch_env()
    assert (env.rank, env.world_size, env.master_addr) == (0, 1, "127.0.0.1")
    assert env.master_port > 0
