"""A training process on a cluster: the environment it sets for itself (flight recorder, CUDA allocator), the
device and NCCL communicator it takes, and how step times single out a straggler on CPU and on CUDA."""

from __future__ import annotations

import datetime
import os
import time

import pytest
import torch

import launch.bootstrap as bootstrap
from launch.env import process_defaults
from launch.monitor import CUDA_COLUMNS, HOST_COLUMNS, StepTimer, straggler

RECORDER = ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DUMP_ON_TIMEOUT",
            "TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "PYTORCH_CUDA_ALLOC_CONF",
            "PYTORCH_ALLOC_CONF")


def test_defaults_fill_what_the_user_left_unset(tmp_path):
    on_gpu = process_defaults({}, device_type="cuda", run_dir=tmp_path)
    assert on_gpu == {"TORCH_FR_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                      "TORCH_FR_DUMP_TEMP_FILE": f"{tmp_path.resolve()}/flight_recorder/rank_",
                      "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert "PYTORCH_CUDA_ALLOC_CONF" not in process_defaults({}, device_type="cpu", run_dir=tmp_path)
    # a value the user set, under today's name or the older one, is theirs: no default beside it
    users = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "0", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/scratch/fr_",
             "TORCH_NCCL_DUMP_ON_TIMEOUT": "0", "PYTORCH_ALLOC_CONF": "backend:cudaMallocAsync"}
    assert process_defaults(users, device_type="cuda", run_dir=tmp_path) == {}


def test_each_run_traces_into_its_own_directory_unless_the_user_chose(tmp_path, monkeypatch):
    for name in RECORDER:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bootstrap, "_defaults_set", {})
    monkeypatch.setattr(bootstrap, "discover", lambda: bootstrap.DistEnv())  # one process: nothing to start
    bootstrap.init_distributed("cpu", run_dir=tmp_path / "a")
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == f"{(tmp_path / 'a').resolve()}/flight_recorder/rank_"
    bootstrap.init_distributed("cpu", run_dir=tmp_path / "b")  # a second run in this process (tests, scripts)
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == f"{(tmp_path / 'b').resolve()}/flight_recorder/rank_"
    monkeypatch.setenv("TORCH_FR_DUMP_TEMP_FILE", "/scratch/fr_")
    bootstrap.init_distributed("cpu", run_dir=tmp_path / "c")
    assert os.environ["TORCH_FR_DUMP_TEMP_FILE"] == "/scratch/fr_"


def test_cuda_rank_takes_its_device_modulo_the_visible_ones_and_starts_nccl_on_it(tmp_path, monkeypatch):
    """`srun --gpus-per-task=1`: local rank 3 sees one device, cuda:0. No GPU here: CUDA and NCCL are recorded."""
    for name in RECORDER:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(bootstrap, "_defaults_set", {})
    monkeypatch.setattr(bootstrap, "discover", lambda: bootstrap.DistEnv(rank=3, world_size=4, local_rank=3))
    monkeypatch.setattr(bootstrap, "_export", lambda env: None)
    calls = {}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda d: calls.update(device=d, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF")))
    monkeypatch.setattr(bootstrap.dist, "init_process_group", lambda **kw: calls.update(init=kw))
    bootstrap.init_distributed("cuda", timeout_minutes=3, run_dir=tmp_path)
    assert calls["device"] == torch.device("cuda", 0)
    assert calls["alloc_conf"] == "expandable_segments:True"  # set before CUDA initialises
    assert calls["init"]["backend"] == "nccl" and calls["init"]["device_id"] == torch.device("cuda", 0)
    assert calls["init"]["timeout"] == datetime.timedelta(minutes=3)
    assert (tmp_path / "flight_recorder").is_dir()  # NCCL writes its timeout dumps into it; it must exist


def test_cpu_step_times_are_host_clocks_per_step():
    timer = StepTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.step():
            time.sleep(0.01)
    assert timer.columns == HOST_COLUMNS and timer.steps == 3
    wall, cpu = timer.read()
    assert wall >= 0.01 and cpu < wall  # sleeping uses no CPU
    assert timer.steps == 0  # the next window starts


def test_straggler_on_cpu_is_the_rank_using_more_cpu_time():
    times = torch.tensor([[1.0, 0.40], [1.0, 0.60], [1.0, 0.45]], dtype=torch.float64)  # wall, cpu per rank
    assert straggler(times, HOST_COLUMNS) == 1
    times[1, 1] = 0.48
    assert straggler(times, HOST_COLUMNS) is None


def test_straggler_on_cuda_is_the_rank_whose_gpu_waits_for_its_host():
    """CPU time equals wall time on every CUDA rank; the GPU's idle time between steps is what differs."""
    # wall, cpu, gpu per step, gpu idle waiting for the host
    times = torch.tensor([[1.0, 1.0, 1.0, 0.00], [1.0, 1.0, 0.7, 0.30], [1.0, 1.0, 1.0, 0.01]], dtype=torch.float64)
    assert straggler(times, CUDA_COLUMNS) == 1
    times[1, 3] = 0.2  # within a quarter step of the median rank's
    assert straggler(times, CUDA_COLUMNS) is None


@pytest.mark.gpu
def test_cuda_step_times_come_from_events_and_show_the_gpu_waiting_for_its_host():
    timer = StepTimer(torch.device("cuda"))
    x = torch.randn(1024, 1024, device="cuda")
    for _ in range(3):
        with timer.step():
            for _ in range(10):
                x = torch.tanh(x @ x)
        torch.cuda.synchronize()
        time.sleep(0.02)  # the host comes late to the next step: its GPU sits idle meanwhile
    assert timer.columns == CUDA_COLUMNS
    wall, cpu, gpu, gpu_wait = timer.read()
    assert 0 < gpu < wall
    assert 0.015 < gpu_wait < 0.1
    assert timer.read()[2:] == [0.0, 0.0]  # nothing timed since the last read
