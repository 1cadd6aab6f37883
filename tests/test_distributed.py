"""torch.distributed: `daqkd rank` and training under torchrun give what one process gives."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from daqkd.cli import main

from .test_cli_rank import run_rank, tiny_teacher  # noqa: F401  (fixture)


def test_two_processes_match_one(tiny_folder: Path, tiny_teacher: Path, tmp_path: Path) -> None:  # noqa: F811
    args = ["--data", str(tiny_folder), "--weights", str(tiny_teacher), "--augs", "none,trivialaugment+cutmix",
            "--batch-size", "8", "--variance-group", "4", "--seed", "5"]
    single = run_rank(args, tmp_path / "one.json")
    torchrun(["rank", *args, "--no-progress", "--out", str(tmp_path / "two.json")])
    double = json.loads((tmp_path / "two.json").read_text())
    assert double["images"] == single["images"]
    one = {c["name"]: c for c in single["candidates"]}
    for c in double["candidates"]:
        for key in ("cmi", "centroid_ce", "ce", "accuracy", "score"):
            assert c[key] == pytest.approx(one[c["name"]][key], abs=1e-9), (c["name"], key)
        # shards are 16 and 20 images: groups of 4 never straddle them, so the variance matches too
        assert c["variance"] == pytest.approx(one[c["name"]]["variance"], abs=1e-9)


# --- training under torchrun ---------------------------------------------------------------------

WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DAQKD_FUSED_KERNELS": "0"}
"""One thread per process, eager quantizer kernels like the test process (conftest)."""


def torchrun_args(args: list[str], processes: int) -> list[str]:
    """torchrun's command line for ``daqkd ARGS`` in N processes on free ports."""
    return ["--standalone", "--nproc_per_node", str(processes), "-m", "daqkd.cli", *args]


def torchrun(args: list[str], processes: int = 2, timeout: float = 300) -> None:
    """``torchrun --standalone --nproc_per_node N -m daqkd.cli ARGS`` on CPU (gloo), the agent run in
    this process by torchrun's own code (``torch.distributed.run.run``, what the ``torchrun`` script
    calls, without its error-file wrapper, which would point faulthandler at pytest's captured
    stderr): the workers are separate processes as always, and the agent's own interpreter start
    (~4 s of importing torch on 2 cores) is saved. What the agent changes in this process (signal
    handlers, the thread's name) is put back; after ``timeout`` seconds a SIGTERM makes the agent
    stop its workers; a failing worker raises here."""
    import threading

    import torch.multiprocessing
    from torch.distributed import run as torchrun_module

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    thread_name = torch.multiprocessing._get_thread_name()
    alarm = threading.Timer(timeout, os.kill, (os.getpid(), signal.SIGTERM))
    alarm.start()
    try:
        with mock.patch.dict(os.environ, WORKER_ENV):
            torchrun_module.run(torchrun_module.parse_args(torchrun_args(args, processes)))
    finally:
        alarm.cancel()
        for number, handler in handlers.items():
            signal.signal(number, handler)
        torch.multiprocessing._set_thread_name(thread_name)


def torchrun_env_of_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables torchrun gives rank 0 of a group of one, on a free local port."""
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)


def torchrun_process(args: list[str], processes: int = 2) -> subprocess.Popen:
    """The ``torchrun`` command as a process of its own (a session leader, so that a test can kill the
    agent and its workers together, as a lost node or a scheduler does)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args(args, processes)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **WORKER_ENV},
                            start_new_session=True)


def weights(run: Path, name: str = "last.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / name))


def assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    """Every float tensor within atol; integer buffers (BatchNorm counts, quantizer flags) equal."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if value.is_floating_point():
            assert float((got[key] - value).abs().max()) <= atol, key
        else:
            assert torch.equal(got[key], value), key


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# 12 train images (4 per class): one step per epoch, so a kill between epochs is easy to place
TEACHER = ["teacher", "--arch", "resnet20", "--batch-size", "12", "--lr", "0.02", "--seed", "3", "--no-progress",
           "--train-limit-per-class", "4", "--epochs", "10"]


def test_two_training_processes_match_one_and_resume_after_a_kill(tiny_folder: Path, tmp_path: Path,
                                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """A teacher (CutMix on the global batch) trained by 2 processes under torchrun ends where one
    process ends, and a 2-process run killed (SIGKILL to the whole process group) after its second
    epoch and resumed with `torchrun ... --resume --out RUN` ends exactly where the uninterrupted
    2-process run ends, with one log line per epoch; only rank 0 prints and writes.

    Tolerance: after 10 SGD steps, the largest difference of any weight or BatchNorm statistic must
    stay below 0.3. One process differs from itself by 0.07-0.10 when it only changes its thread
    count (float32 sums in another order, amplified by 10 steps of training on 12 images; measured),
    and by 0.95 when the two processes normalize with their own half-batch statistics instead of the
    global batch's (measured by disabling synchronize_batchnorm): the bound separates the two.
    """
    data = ["--data", str(tiny_folder)]
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    assert main([*TEACHER, *data, "--out", str(one)]) == 0
    capfd.readouterr()
    torchrun([*TEACHER, *data, "--out", str(two)])
    assert capfd.readouterr().out.count("epoch 10/10") == 1  # rank 0 prints, rank 1 does not
    assert_close(weights(two), weights(one), atol=0.3)
    for a, b in zip(history(two), history(one), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.02) and a["epoch"] == b["epoch"]

    run = torchrun_process([*TEACHER, *data, "--out", str(killed)])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        log = killed / "metrics.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= 2:
            break
        assert run.poll() is None, run.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert 2 <= len(history(killed)) < 10, "the kill came too late to test a resume"
    torchrun(["teacher", "--resume", "--out", str(killed)])
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in history(killed)] == \
        [{k: v for k, v in h.items() if k not in timing} for h in history(two)]
    resumed, uninterrupted = weights(killed), weights(two)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


@pytest.mark.parametrize("kd", ["kd", "sp"])
def test_a_student_under_torchrun_sees_the_global_batch(kd: str, tiny_folder: Path, tmp_path: Path) -> None:
    """A student with 4-bit LSQ weights, Hinton KD (or similarity-preserving KD, whose B x B
    similarities span the global batch: each process gathers the others' features) and
    RandAugment + CutMix: its first step under 2
    processes (quantizers calibrated on the same batch, teacher and student on each half of the same
    augmented global batch, BatchNorm over both halves, terms averaged) gives the single process's
    loss terms within 1e-5 and the same test accuracy. Activations stay FP here: with 4-bit
    activations a float32 rounding difference moves a few values a whole level, and one process
    alone moves its first loss by 0.8 % when it changes its thread count (measured), so no tight
    comparison is possible there."""
    data = ["--data", str(tiny_folder)]
    teacher = tmp_path / "teacher"
    assert main([*TEACHER[:-1], "1", *data, "--out", str(teacher)]) == 0
    student = ["train", *data, "--teacher", str(teacher), "--method", "lsq", "--w-bits", "4", "--a-bits", "32",
               "--kd", kd, "--aug", "randaugment+cutmix", "--epochs", "1", "--batch-size", "12", "--seed", "1",
               "--train-limit-per-class", "4", "--no-progress"]
    assert main([*student, "--out", str(tmp_path / "s1")]) == 0
    torchrun([*student, "--out", str(tmp_path / "s2")])
    (single,), (double,) = history(tmp_path / "s1"), history(tmp_path / "s2")
    for term in ("train_loss", "train_ce", f"train_{kd}"):
        assert double[term] == pytest.approx(single[term], rel=1e-5), term
    assert double["test_top1"] == single["test_top1"]
    assert double["test_loss"] == pytest.approx(single["test_loss"], rel=1e-3)


def test_ewgs_hessian_delta_under_torchrun_is_the_single_process_one(tiny_folder: Path, tmp_path: Path) -> None:
    """EWGS's Hessian delta (updated at the start of epoch 2; learning rates 0, so that both runs
    take it at the same weights) from 2 processes is the single process's. Every process takes the
    Hessian of the same whole global batches, so BatchNorm must act as the single process's there:
    the synchronized BatchNorm's function took the batch statistics as constants in the second
    derivative, which made 2 processes' deltas 2-16 times smaller, 4 of 18 clipped to 0 (measured
    before the fix). Tolerance 2 %: the quantizers' output scales differ by an ulp between 1 and 2
    processes (their calibration sums in another order), which moved delta by up to 0.17 % (the
    single process under torchrun, one thread each; 0.6 % against a 2-thread process; measured)."""
    data = ["--data", str(tiny_folder)]
    teacher = tmp_path / "teacher"
    assert main([*TEACHER[:-1], "1", *data, "--out", str(teacher)]) == 0
    student = ["train", *data, "--teacher", str(teacher), "--method", "ewgs", "--w-bits", "4", "--a-bits", "32",
               "--ewgs-delta-every", "1", "--ewgs-hessian-probes", "2", "--aug", "none", "--epochs", "2",
               "--lr", "0", "--quant-lr", "0", "--batch-size", "12", "--seed", "1", "--train-limit-per-class", "4",
               "--no-progress"]
    torchrun([*student, "--out", str(tmp_path / "s1")], processes=1)
    torchrun([*student, "--out", str(tmp_path / "s2")])
    single, double = weights(tmp_path / "s1"), weights(tmp_path / "s2")
    deltas = [k for k in single if k.endswith("weight_quantizer.delta")]
    assert len(deltas) == 18 and sum(float(single[k]) > 0 for k in deltas) >= 12  # the update ran
    for key in deltas:
        assert float(double[key]) == pytest.approx(float(single[key]), rel=0.02, abs=1e-6), key


def test_hessian_through_synchronized_batchnorm(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a gloo group of one made to look like two processes (so that GlobalBatchNorm2d runs its
    synchronized function): EWGS's Hessian estimates equal plain BatchNorm's (the pass uses the
    batch's own statistics), and any other second derivative through the synchronized function
    raises instead of silently treating the batch statistics as constants (which gave estimates
    0.1 times and -0.04 times the right ones here, measured before the fix)."""
    import torch.distributed as dist

    import daqkd.runtime
    from daqkd.models import create_model
    from daqkd.quant import QuantConfig, quantize_model
    from daqkd.quant.ewgs import hessian_delta_estimates

    torchrun_env_of_one_process(monkeypatch)
    dist.init_process_group("gloo")
    try:
        torch.manual_seed(0)
        model = quantize_model(create_model("resnet20", 10), QuantConfig("ewgs", 4, 32))
        assert daqkd.runtime.synchronize_batchnorm(model) == 19
        images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
        model.train()(images)  # the quantizers initialize
        ce = torch.nn.functional.cross_entropy
        torch.manual_seed(1)
        plain = hessian_delta_estimates(model, ce, images, labels, probes=2)
        monkeypatch.setattr(daqkd.runtime, "world_size", lambda: 2)
        torch.manual_seed(1)
        synchronized = hessian_delta_estimates(model, ce, images, labels, probes=2)
        assert synchronized.keys() == plain.keys() and len(plain) == 18
        for name, value in plain.items():
            assert synchronized[name] == pytest.approx(value, rel=1e-5), name
        weights = [p for p in model.parameters() if p.ndim == 4]  # the synchronized function: no second derivative
        torch.autograd.grad(ce(model(images), labels), weights)
        with pytest.raises(RuntimeError, match="differentiable once only: .* inside daqkd.runtime.replicated_batches"):
            torch.autograd.grad(ce(model(images), labels), weights, create_graph=True)
    finally:
        dist.destroy_process_group()


def test_batch_must_split_evenly(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A batch that 2 processes cannot share is one error line and exit 2 (the process group is
    faked: each rank of a real torchrun run takes this same path before its first collective)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert main([*TEACHER[:3], "--batch-size", "9", "--epochs", "1", "--data", str(tiny_folder),
                 "--out", str(tmp_path / "odd"), "--no-progress"]) == 2
    assert capsys.readouterr().err == \
        "daqkd: error: --batch-size 9 does not split evenly into 2 processes: use a multiple of 2 " \
        "(each process takes the same share of every batch)\n"
    assert not (tmp_path / "odd").exists()  # no half-made run directory


def test_a_command_leaves_the_process_group_it_joined(tiny_folder: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun (a real gloo group of one here) the command joins the group and leaves it
    before returning, error or not: a gloo process exiting with its group alive can abort during
    interpreter finalization (SIGABRT, which failed the two-process test above now and then). A
    group the caller joined before is left alone."""
    import torch.distributed as dist

    torchrun_env_of_one_process(monkeypatch)
    joined: list[bool] = []
    real_destroy = dist.destroy_process_group

    def destroy() -> None:
        joined.append(dist.is_initialized())
        real_destroy()

    monkeypatch.setattr(dist, "destroy_process_group", destroy)
    try:
        assert main([*TEACHER[:3], "--batch-size", "6", "--epochs", "1", "--data", str(tiny_folder),
                     "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        assert joined == [True] and not dist.is_initialized()
        assert main([*TEACHER[:3], "--batch-size", "6", "--epochs", "0", "--data", str(tiny_folder),
                     "--out", str(tmp_path / "bad"), "--no-progress"]) == 2  # an error leaves it too
        assert joined == [True, True] and not dist.is_initialized()
        # a group the caller made (a notebook under torchrun) is the caller's to leave
        dist.init_process_group("gloo")
        assert main([*TEACHER[:3], "--batch-size", "6", "--epochs", "1", "--data", str(tiny_folder),
                     "--out", str(tmp_path / "mine"), "--no-progress"]) == 0
        assert joined == [True, True] and dist.is_initialized()
    finally:
        if dist.is_initialized():
            real_destroy()


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA placement logic, on CPU with CUDA's answers stubbed: 4 visible GPUs, local rank 2 of 4."""
    import torch.distributed as dist

    from daqkd.errors import DaqkdError
    from daqkd.runtime import select_device

    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert select_device("auto") == select_device("cuda") == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)] * 2  # made the current device, as NCCL expects
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(DaqkdError, match="would put them all on one GPU: pass --device cuda"):
        select_device("cuda:1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node may pick its GPU
    assert select_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(DaqkdError, match="only 4 CUDA device"):
        select_device("cuda")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)  # without torchrun: as asked, current device untouched
    current.clear()
    assert select_device("cuda") == torch.device("cuda") and select_device("cuda:3") == torch.device("cuda", 3)
    assert current == []


def test_a_torchrun_group_of_one_takes_the_ddp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc_per_node 1 joins a process group of one, so its training step is DDP's, the
    code path of several processes (benchmarks/gpu_issue16.sh compares it with a plain run on a GPU).
    --compile works there too: DDP's forward stays eager and the student's graphs are split at its
    gradient buckets (DDPOptimizer), traced here with aot_eager (see test_train), same weights."""
    import torch.distributed as dist

    import daqkd.train as train_module
    from daqkd.runtime import init_distributed

    from .conftest import make_image_folder
    from .test_train import small_trainer

    torchrun_env_of_one_process(monkeypatch)
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    assert init_distributed() == (0, 1)
    try:
        folder = make_image_folder(tmp_path / "d", classes=2, per_class=8)
        eager = small_trainer(folder, tmp_path / "run", epochs=1, quantized=False)
        assert isinstance(eager.forward_model, torch.nn.parallel.DistributedDataParallel)
        eager.fit()
        assert math.isfinite(eager.history[-1]["train_loss"])
        torch._dynamo.reset()
        compiled = small_trainer(folder, tmp_path / "compiled", epochs=1, quantized=False, compile=True)
        compiled.fit()
    finally:
        torch._dynamo.reset()  # its caches hold the DDP module of a group about to go
        dist.destroy_process_group()
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-5)
    expected = eager.model.state_dict()
    for key, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    monkeypatch.delenv("RANK")
    assert init_distributed() == (0, 1) and not dist.is_initialized()  # a plain process joins nothing


@pytest.mark.parametrize("rank,world,local,line", [
    ("0", "2", "2", "continue with: torchrun --nproc_per_node 2 -m daqkd train --resume --out {run}"),
    ("0", "8", "4", "continue with: torchrun (the same launcher options) -m daqkd train --resume --out {run}"),
    ("0", None, None, "continue with: torchrun (the same launcher options) -m daqkd train --resume --out {run}"),
    ("1", "2", "2", None),
])
def test_ctrl_c_under_torchrun_is_one_line_naming_the_launcher(rank: str, world: str | None, local: str | None,
                                                                line: str | None, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C reaches every process of a torchrun group: rank 0 alone says how to resume, with
    torchrun (the run resumes on any number of processes; one node: its process count); before the
    run directory holds a run, it says to run the command again."""
    import daqkd.cli.train as train_command

    def interrupt(args):
        raise KeyboardInterrupt

    for name, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_WORLD_SIZE": local,
                        "MASTER_ADDR": "127.0.0.1"}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(train_command, "cmd_train", interrupt)  # the parser is built at each main()
    run = tmp_path / "R"
    assert main(["train", "--resume", "--out", str(run)]) == 130
    before = [] if line is None else [f"daqkd: interrupted before {run} held a run: run the same command again"]
    assert capsys.readouterr().err.strip().splitlines() == before
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(["train", "--resume", "--out", str(run)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ([] if line is None else [
        (f"daqkd: interrupted: {run} keeps its last checkpoint (epoch end or --save-every step); "
        f"{line.format(run=run)}")])
