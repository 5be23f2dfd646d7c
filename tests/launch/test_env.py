"""Environment discovery for each launcher, from environments recorded on real launches (trimmed to the
variables that matter; values as recorded on the single-node test cluster, host `vm`)."""

import pytest

from launch.env import (DistEnv, discover, first_host_of, from_slurm, launcher_of, local_rank_from_names,
                        mpi_env, slurm_port)

# `torchrun --nnodes 1 --nproc_per_node 2`, rank 1.
TORCHRUN_RANK1 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511", "GROUP_RANK": "0",
                  "TORCHELASTIC_RUN_ID": "none"}
# `srun -n 2` inside a job, task 1.
SRUN_TASK1 = {"SLURM_JOB_ID": "1", "SLURM_JOBID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_NODELIST": "vm",
              "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "1",
              "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2",
              "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_TASKS_PER_NODE": "2",
              "SLURMD_NODENAME": "vm", "SLURM_SUBMIT_DIR": "/work/main"}
# The batch script of `sbatch -n 2` after one requeue: a shell, not a task of a step.
SBATCH_SCRIPT = {"SLURM_JOB_ID": "3", "SLURM_JOB_NODELIST": "vm", "SLURM_LOCALID": "0", "SLURM_NNODES": "1",
                 "SLURM_NODEID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_RESTART_COUNT": "1"}
# `srun -n 1 torchrun --standalone --nproc-per-node 2`, worker rank 1: torchrun's variables win.
TORCHRUN_UNDER_SRUN = {"GROUP_RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost",
                       "MASTER_PORT": "39921", "RANK": "1", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "vm",
                       "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0",
                       "SLURM_STEP_NODELIST": "vm", "SLURM_STEP_NUM_TASKS": "1", "WORLD_SIZE": "2"}
# Open MPI 5 `mpirun -np 2`, rank 1.
MPIRUN_RANK1 = {"OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "OMPI_COMM_WORLD_NODE_RANK": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                "OMPI_UNIVERSE_SIZE": "2", "PMIX_RANK": "1", "PMIX_HOSTNAME": "vm",
                "PMIX_NAMESPACE": "prterun-vm-12471@1"}


def test_torchrun_environment():
    env = discover(TORCHRUN_RANK1)
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, master_addr="127.0.0.1", master_port=29511,
                          launcher="torchrun")


def test_no_launcher_means_one_process():
    assert discover({}) == DistEnv()


def test_malformed_environment_is_reported():
    with pytest.raises(RuntimeError, match="malformed torchrun environment"):
        discover({**TORCHRUN_RANK1, "RANK": "one"})
    with pytest.raises(RuntimeError, match="malformed SLURM environment"):
        discover({**SRUN_TASK1, "SLURM_PROCID": ""})


def test_srun_task():
    env = discover(SRUN_TASK1)
    assert env == DistEnv(rank=1, world_size=2, local_rank=1, master_addr="vm", master_port=slurm_port(1, 0),
                          launcher="slurm")


def test_srun_multi_node_rank0_host_from_scontrol():
    # Task 5 of `srun -N 2 --ntasks-per-node 4` on gpu[07-08]; `scontrol show hostnames gpu[07-08]` recorded.
    environ = {**SRUN_TASK1, "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]",
               "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
               "SLURM_STEP_NUM_TASKS": "8"}
    recorded = {"gpu[07-08]": ["gpu07", "gpu08"]}
    env = from_slurm(environ, hostnames=recorded.__getitem__)
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="gpu07",
                          master_port=slurm_port(4242, 0), launcher="slurm")


def test_srun_respects_explicit_master_address():
    env = discover({**SRUN_TASK1, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456"})
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 23456)


def test_batch_script_is_one_process_not_a_task():
    assert launcher_of(SBATCH_SCRIPT) == "single" and discover(SBATCH_SCRIPT) == DistEnv()


def test_torchrun_under_srun_uses_torchrun_ranks():
    env = discover(TORCHRUN_UNDER_SRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 1, 2, 1)


def test_mpirun_is_detected_even_inside_slurm():
    assert launcher_of(MPIRUN_RANK1) == "mpi"
    assert launcher_of({**SBATCH_SCRIPT, **MPIRUN_RANK1}) == "mpi"


def test_forced_launcher():
    assert launcher_of({**SRUN_TASK1, "PRETRAIN_LAUNCHER": "single"}) == "single"
    with pytest.raises(RuntimeError, match="PRETRAIN_LAUNCHER"):
        launcher_of({"PRETRAIN_LAUNCHER": "pbs"})
    with pytest.raises(RuntimeError, match="no slurm variables"):
        discover({"PRETRAIN_LAUNCHER": "slurm"})


def test_mpi_local_ranks_from_processor_names():
    # What 4 ranks on 2 hosts exchanged (MPI_Get_processor_name), block and round-robin placement.
    assert [local_rank_from_names(["n1", "n1", "n2", "n2"], r) for r in range(4)] == [0, 1, 0, 1]
    assert [local_rank_from_names(["n1", "n2", "n1", "n2"], r) for r in range(4)] == [0, 0, 1, 1]
    assert mpi_env(3, ["n1", "n1", "n2", "n2"], "n1", 41000) == DistEnv(
        rank=3, world_size=4, local_rank=1, master_addr="n1", master_port=41000, launcher="mpi")


@pytest.mark.parametrize("nodelist,first", [
    ("vm", "vm"), ("node[001-003,010],gpu-a[7-8]", "node001"), ("a[1-2]-b[3-4],c", "a1-b3"),
    ("x12,x[1-2]", "x12"), ("gpu[7,3]", "gpu7"),
])
def test_first_host_without_scontrol(nodelist, first):
    assert first_host_of(nodelist) == first


def test_ports_differ_by_job_and_step_and_stay_below_ephemeral_range():
    ports = {slurm_port(job, step) for job in range(1000, 1100) for step in range(4)}
    assert len(ports) == 400 and all(15000 <= p < 31000 for p in ports)
