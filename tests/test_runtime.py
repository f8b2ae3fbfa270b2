"""instdisc.runtime: the torchrun command a multi-process stage launches itself with."""

from __future__ import annotations

import sys

from instdisc.runtime import inside_torchrun, launch_command

ARGS = ["--params", "params.yaml"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_one_process_runs_as_it_is():
    assert launch_command("instdisc.stages.pretrain", ARGS, 1, environ={}) is None


def test_several_processes_on_one_machine_use_a_standalone_rendezvous():
    assert launch_command("instdisc.stages.pretrain", ARGS, 8, environ={}) == [
        *TORCHRUN, "--nproc-per-node=8", "--standalone", "-m", "instdisc.stages.pretrain", *ARGS]


def test_several_machines_meet_at_the_c10d_endpoint():
    command = launch_command("m", [], 4, nnodes=2, rdzv_endpoint="node0:29400", environ={})
    assert command == [*TORCHRUN, "--nproc-per-node=4", "--nnodes=2", "--rdzv-backend=c10d",
                       "--rdzv-endpoint=node0:29400", "--rdzv-id=m", "-m", "m"]


def test_a_torchrun_worker_never_launches_again():
    worker = {"LOCAL_RANK": "1", "WORLD_SIZE": "8", "RANK": "1"}
    assert inside_torchrun(worker) and not inside_torchrun({})
    assert launch_command("instdisc.stages.pretrain", ARGS, 8, environ=worker) is None
