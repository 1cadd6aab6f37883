"""Teacher, student and eval: loss values, learning, exact resume, end-to-end CLI runs, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from daqkd.cli import main
from daqkd.data import load_image_folder
from daqkd.distill import DistillConfig, create_loss
from daqkd.errors import DaqkdError
from daqkd.models import NormalizedModel, create_model, parse_normalization
from daqkd.quant import QuantConfig, quantize_model
from daqkd.train import TrainConfig, Trainer

from .conftest import make_image_folder


def softmax(v: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def test_kd_losses_equal_hand_computation() -> None:
    s, t = [1.0, 2.0, 3.0], [3.0, 2.0, 1.0]
    student, teacher, label = torch.tensor([s]), torch.tensor([t]), torch.tensor([2])
    ps, pt = softmax(s, 4.0), softmax(t, 4.0)
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt)) * 16  # T^2 KL(p_t || p_s)
    ce = -math.log(softmax(s)[2])
    kd = create_loss("kd", DistillConfig(gamma=1.0, alpha=2.0, temperature=4.0))(student, teacher, label)
    assert kd["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert kd["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert kd["loss"].item() == pytest.approx(ce + 2 * kl, rel=1e-5)
    assert create_loss("sqakd")(student, teacher, label)["loss"].item() == pytest.approx(kl, rel=1e-5)
    soft = torch.tensor([[0.25, 0.0, 0.75]])
    none = create_loss("none", DistillConfig(gamma=0.5))(student, None, soft)
    expected = -(0.25 * math.log(softmax(s)[0]) + 0.75 * math.log(softmax(s)[2]))
    assert none["loss"].item() == pytest.approx(0.5 * expected, rel=1e-6)
    with pytest.raises(DaqkdError, match="unknown --kd 'crd'"):
        create_loss("crd")


def test_label_smoothing_applies_to_soft_targets_too() -> None:
    s = [1.0, 2.0, 3.0]
    soft = torch.tensor([[0.25, 0.0, 0.75]])  # a CutMix label
    smoothed = [0.9 * t + 0.1 / 3 for t in (0.25, 0.0, 0.75)]
    expected = -sum(t * math.log(p) for t, p in zip(smoothed, softmax(s)))
    loss = create_loss("none", DistillConfig(label_smoothing=0.1))(torch.tensor([s]), None, soft)
    assert loss["loss"].item() == pytest.approx(expected, rel=1e-6)
    hard = create_loss("none", DistillConfig(label_smoothing=0.1))(torch.tensor([s]), None, torch.tensor([2]))
    assert hard["loss"].item() == pytest.approx(
        -sum(t * math.log(p) for t, p in zip([0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3], softmax(s))), rel=1e-6)


def test_data_statistics_over_every_pixel_of_mixed_sizes() -> None:
    from daqkd.api import data_statistics
    from daqkd.data import ImageSet

    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
              for h, w in ((8, 8), (5, 12), (20, 3))]
    data = ImageSet(images, torch.tensor([0, 1, 0]), ["a", "b"], "mixed")
    pixels = torch.cat([im.double().div(255).reshape(3, -1) for im in images], dim=1)  # naive
    stats = data_statistics(data)
    assert stats.mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-9)
    assert stats.std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-9)
    uniform = ImageSet(torch.stack([images[0], images[0].flip(-1)]), torch.tensor([0, 1]), ["a", "b"], "u")
    both = torch.cat([images[0].double().div(255).reshape(3, -1)] * 2, dim=1)
    assert data_statistics(uniform).std == pytest.approx(both.std(1, unbiased=False).tolist(), abs=1e-9)


def test_version_and_no_split_for_training(capsys: pytest.CaptureFixture[str]) -> None:
    from daqkd import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"daqkd {__version__}"
    required = {"teacher": ["--arch", "resnet20"], "train": ["--teacher", "t"], "sweep": []}
    for command, needed in required.items():  # they read both splits: --split would be ignored
        with pytest.raises(SystemExit) as exit_info:
            main([command, *needed, "--split", "test", "--out", "x"])
        assert exit_info.value.code == 2 and "unrecognized arguments: --split" in capsys.readouterr().err


def small_trainer(folder: Path, run: Path, epochs: int, quantized: bool, method: str = "ewgs",
                  cumulative_batchnorm: bool = False, **kw) -> Trainer:
    train = load_image_folder(folder, "train")
    test = load_image_folder(folder, "test")
    norm = parse_normalization("cifar10")
    torch.manual_seed(0)
    net = create_model("resnet20", train.num_classes)
    teacher = None
    if quantized:
        teacher = NormalizedModel(create_model("resnet20", train.num_classes), norm)
        quantize_model(net, QuantConfig(method, 2, 2))
    if cumulative_batchnorm:
        # at 4-5 steps per epoch momentum 0.1 leaves the running statistics near their init (mean
        # 0, var 1): a random-init 2-bit student calibrated on train-mode activations then predicts
        # one class in eval mode, and its test top-1 never moves (not compilable: data-dependent)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
    loss = create_loss("kd" if quantized else "none")
    config = TrainConfig(epochs=epochs, batch_size=8, aug="autoaugment-cifar10+cutmix" if quantized else "identity",
                         optimizer="adam", lr=1e-3, quant_lr=1e-3, seed=1, **kw)
    return Trainer(NormalizedModel(net, norm), loss, train, test, config, run, torch.device("cpu"),
                   {"arch": "resnet20", "normalize": norm.spec()}, teacher=teacher, progress=False)


def test_quantizers_calibrate_on_train_mode_activations_and_leave_batchnorm_alone(tmp_path: Path,
                                                                                   tiny_folder: Path) -> None:
    """A student that does not start from a trained model (BatchNorm running statistics 0 and 1):
    its first quantized layer's LSQ step is 2 mean|x| / sqrt(Q_P) (Esser et al. 2020) of the input a
    train-mode forward gives it, as every training step does, not of the eval-mode one; and the
    calibration leaves the running statistics as they were."""
    import copy
    import math

    train, test = load_image_folder(tiny_folder, "train"), load_image_folder(tiny_folder, "test")
    norm = parse_normalization("cifar10")
    torch.manual_seed(0)
    net = create_model("resnet20", train.num_classes)
    fp = NormalizedModel(copy.deepcopy(net), norm).train()
    quantize_model(net, QuantConfig("lsq", 4, 4))
    running = {k: v.clone() for k, v in net.state_dict().items() if k.split(".")[-1].startswith(("running", "num_"))}
    config = TrainConfig(epochs=1, batch_size=12, aug="none", seed=1)
    trainer = Trainer(NormalizedModel(net, norm), create_loss("none"), train, test, config, tmp_path / "r",
                      torch.device("cpu"), {"arch": "resnet20", "normalize": norm.spec()}, progress=False)
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in running.items())
    from daqkd.runtime import mix_seed

    batch, _ = trainer._batch(torch.arange(12), torch.Generator().manual_seed(mix_seed(1, 2**32)))
    seen: list[torch.Tensor] = []
    fp.model.layer1[0].conv1.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        fp(batch)
    expected = 2 * seen[0].abs().mean() / math.sqrt(15)  # unsigned 4 bits: Q_P = 15
    assert float(net.layer1[0].conv1.act_quantizer.step.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_loss_falls_when_overfitting_64_images(tmp_path: Path) -> None:
    folder = make_image_folder(tmp_path / "d", classes=4, per_class=16)
    trainer = small_trainer(folder, tmp_path / "run", epochs=6, quantized=False)
    trainer.fit()
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.history[-1]["test_top1"] > 50


@pytest.mark.parametrize("augment_workers", [0, 2], ids=["in-process", "augment-workers"])
def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, tiny_folder: Path, augment_workers: int) -> None:
    """A run killed mid-epoch and resumed ends with the uninterrupted run's weights and log, to the bit.
    With 2 augment workers (1 thread each, batches augmented ahead) the killed and the resumed runs
    are compared with the uninterrupted in-process run: the workers' batches are the process's own."""
    import multiprocessing

    whole = small_trainer(tiny_folder, tmp_path / "whole", epochs=2, quantized=True, save_every=3)
    whole.fit()

    class Killed(Exception):
        pass

    def kill_at(step: int) -> None:
        if step == 6:  # just after the checkpoint of step 6, mid-epoch 2 (4 steps per epoch)
            raise Killed

    def trainer() -> Trainer:
        return small_trainer(tiny_folder, tmp_path / "killed", epochs=2, quantized=True, save_every=3,
                             augment_workers=augment_workers)

    first = trainer()
    first.on_step = kill_at
    with pytest.raises(Killed):
        first.fit()
    assert not multiprocessing.active_children()  # augment workers stop with the run
    second = trainer()
    assert second.resume() and (second.epoch, second.step_in_epoch) == (1, 2)
    second.fit()
    expected = whole.model.state_dict()
    for key, value in second.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert [h["test_top1"] for h in second.history] == [h["test_top1"] for h in whole.history]
    # the log equals the uninterrupted one, train loss of the resumed epoch included (timings aside)
    assert _log(tmp_path / "killed") == _log(tmp_path / "whole")


def test_compiled_step_is_one_graph_and_trains_like_eager(tmp_path: Path, tiny_folder: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile traces teacher, student, fake quantizers (forward and backward) and KD loss with
    fullgraph=True, so a graph break would stop the run; traced with aot_eager (inductor's code
    generation takes minutes on 2 cores; benchmarks/gpu_throughput.py runs it)."""
    from torch._dynamo.utils import counters

    import daqkd.train as train_module

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    counters.clear()
    eager = small_trainer(tiny_folder, tmp_path / "eager", epochs=1, quantized=True)
    eager.fit()
    assert not counters["stats"]["unique_graphs"]
    compiled = small_trainer(tiny_folder, tmp_path / "compiled", epochs=1, quantized=True, compile=True)
    compiled.fit()
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, reused 4 steps
    # a float ulp in a fused sum can move a 2-bit activation one level: close, not identical
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    expected = eager.model.state_dict()
    for key, value in compiled.model.state_dict().items():
        torch.testing.assert_close(value.float(), expected[key].float(), rtol=1e-3, atol=1e-3, msg=key)


def test_an_unknown_compile_backend_is_an_error_naming_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import daqkd.train as train_module

    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "nonsense")  # as read from DAQKD_COMPILE_BACKEND

    class Step:
        def __call__(self, x: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": x.sum()}

    with pytest.raises(DaqkdError, match=r"^DAQKD_COMPILE_BACKEND='nonsense' is not a torch.compile backend: use one "
                                         r"of .*\baot_eager\b.*\binductor\b"):
        train_module.compile_step(Step(), torch.device("cpu"))


def _log(run: Path) -> list[dict]:
    timing = ("seconds", "images_per_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_reading_the_loss_every_few_steps_changes_nothing(tmp_path: Path, tiny_folder: Path) -> None:
    """Loss terms read on the host every 3 steps (as on CUDA, every 50) instead of every step: the
    same weights, and the same train log to the bit (sums added in step order), across a checkpoint
    at step 5 (epoch 2, step 1 of 4) that forces a read mid-way."""
    every_step = small_trainer(tiny_folder, tmp_path / "every", epochs=2, quantized=True, save_every=5)
    assert every_step.sync_every == 1  # the CPU default
    every_step.fit()
    batched = small_trainer(tiny_folder, tmp_path / "batched", epochs=2, quantized=True, save_every=5)
    batched.sync_every = 3
    reads = []
    read = batched._read_terms
    batched._read_terms = lambda: (reads.append(len(batched._unread)), read())[1]
    batched.fit()
    assert [n for n in reads if n] == [3, 1, 1, 3]  # steps 1-3, 4 (epoch end), 5 (checkpoint), 6-8
    expected = every_step.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in batched.model.state_dict().items())
    assert _log(tmp_path / "batched") == _log(tmp_path / "every")


def test_kill_between_log_line_and_state_save_leaves_no_duplicate(tmp_path: Path, tiny_folder: Path) -> None:
    import shutil

    whole = small_trainer(tiny_folder, tmp_path / "whole", epochs=2, quantized=False)
    whole.fit()
    run = tmp_path / "run"
    first = small_trainer(tiny_folder, run, epochs=2, quantized=False)
    saved = tmp_path / "state-after-epoch-1.pt"
    first.on_step = lambda step: shutil.copy(run / "state.pt", saved) if step == 5 else None  # epoch 2 begins
    first.fit()
    # as if killed after epoch 2's metrics line but before its state.pt: the state is epoch 1's
    shutil.copy(saved, run / "state.pt")
    assert len(_log(run)) == 2
    second = small_trainer(tiny_folder, run, epochs=2, quantized=False)
    assert second.resume() and second.epoch == 1
    assert len(_log(run)) == 1  # the log is cut back to what the state has finished
    second.fit()
    assert _log(run) == _log(tmp_path / "whole")


@pytest.mark.parametrize("sync_every", [1, 4], ids=["read-every-step", "read-every-4-steps"])
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path: Path, tiny_folder: Path,
                                                                         sync_every: int) -> None:
    """Read every 4 steps, the NaN of step 6 is found after step 8, and still reported as step 6's
    (epoch 2, step 2), with epoch 1's state kept: nothing is saved before its steps are read."""
    trainer = small_trainer(tiny_folder, tmp_path / "run", epochs=2, quantized=False)
    trainer.sync_every = sync_every

    def poison(step: int) -> None:
        if step == 5:  # first step of epoch 2; epoch 1 ended with a checkpoint
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer.on_step = poison
    expected = (r"the loss became nan at epoch 2, step 2; the last good state is .*state.pt: .*"
                r"start a new run \(another --out\) with lower learning rates")
    with pytest.raises(DaqkdError, match=expected):
        trainer.fit()
    again = small_trainer(tiny_folder, tmp_path / "run", epochs=2, quantized=False)
    assert again.resume() and again.epoch == 1
    assert all(torch.isfinite(p).all() for p in again.model.parameters())


def test_teacher_train_eval_end_to_end(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(tiny_folder), "--seed", "0"]
    teacher = tmp_path / "teacher"
    assert main(["teacher", *data, "--arch", "resnet20", "--epochs", "2", "--batch-size", "12", "--lr", "0.05",
                 "--out", str(teacher), "--no-progress"]) == 0
    for name in ("model.safetensors", "last.safetensors", "state.pt", "config.json", "metrics.jsonl"):
        assert (teacher / name).is_file(), name
    assert list((teacher / "tensorboard").iterdir())
    lines = (teacher / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert json.loads((teacher / "config.json").read_text())["args"]["arch"] == "resnet20"

    student = tmp_path / "student"
    assert main(["train", *data, "--teacher", str(teacher), "--method", "lsq", "--w-bits", "2", "--a-bits", "3",
                 "--kd", "kd", "--aug", "auto", "--augs", "none,randaugment+cutmix", "--epochs", "1",
                 "--batch-size", "12", "--out", str(student), "--no-progress"]) == 0
    rank = json.loads((student / "rank.json").read_text())
    assert rank["selected"] in ("none", "randaugment+cutmix")
    assert f"the metric selected {rank['selected']}" in capsys.readouterr().out

    report_file = tmp_path / "eval.json"
    assert main(["eval", str(student), *data, "--out", str(report_file)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    assert (report["w_bits"], report["a_bits"], report["method"]) == (2, 3, "lsq")
    assert set(report["per_class_top1"]) == {"class_0", "class_1", "class_2"}
    assert 0 <= report["top1"] <= report["top5"] <= 100
    assert 10 < report["size"]["compression"] < 16  # 2-bit middle layers, FP stem and head
    assert "top-1" in printed and "class_2" in printed
    metrics = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert report["top1"] == pytest.approx(metrics[-1]["test_top1"])  # eval reloads what training measured


@pytest.mark.parametrize("args,message", [
    (["train", "--teacher", "{teacher}", "--w-bits", "9"], "--w-bits must be an integer from 1 to 8"),
    (["train", "--teacher", "{teacher}", "--method", "lsq", "--aug", "bogus"], "unknown augmentation 'bogus'"),
    (["train", "--teacher", "{teacher}", "--aug", "randaugment,none"], "--aug takes one augmentation"),
    (["teacher", "--arch", "resnet20", "--aug", "all"], "--aug takes one augmentation, got 'all'"),
    (["eval", "{tmp}"], "holds no model.safetensors"),
    (["teacher", "--arch", "resnet20", "--resume"], "has no config.json"),
])
def test_training_errors(args: list[str], message: str, tmp_path: Path, tiny_folder: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    teacher = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(teacher), "--no-progress"]) == 0
    capsys.readouterr()
    filled = [a.format(teacher=teacher, tmp=tmp_path) for a in args]
    extra = [] if filled[0] == "eval" else ["--out", str(tmp_path / "new"), "--no-progress"]
    assert main([*filled, "--data", str(tiny_folder), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_train_limit_and_eval_every(tmp_path: Path, tiny_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--train-limit-per-class limits the train split only; --eval-every skips test passes but never
    the last epoch's, and the best checkpoint comes from evaluated epochs."""
    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--train-limit-per-class", "4",
                 "--eval-every", "2", "--epochs", "3", "--batch-size", "6", "--out", str(run), "--no-progress"]) == 0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]  # 3 classes x 4 images = 2 batches of 6 per epoch
    assert ["test_top1" in line for line in lines] == [False, True, True]
    printed = capsys.readouterr().out
    assert "epoch 1/3: loss" in printed and "(test every 2 epochs)" in printed
    report = tmp_path / "e.json"
    assert main(["eval", str(run), "--data", str(tiny_folder), "--out", str(report)]) == 0
    assert json.loads(report.read_text())["images"] == 36  # the whole test split
    best = max(line["test_top1"] for line in lines if "test_top1" in line)
    assert json.loads(report.read_text())["top1"] == pytest.approx(best)


def test_feature_kd_losses_equal_a_naive_computation() -> None:
    from daqkd.distill import DistillConfig, stage_outputs

    generator = torch.Generator().manual_seed(0)
    student_f = {"a": torch.randn(3, 4, 5, 5, generator=generator), "b": torch.randn(3, 2, 3, 3, generator=generator)}
    teacher_f = {"a": torch.randn(3, 6, 5, 5, generator=generator), "b": torch.randn(3, 8, 3, 3, generator=generator)}
    logits, labels = torch.randn(3, 4, generator=generator), torch.tensor([0, 3, 1])
    ce = float(torch.nn.functional.cross_entropy(logits, labels))

    def naive_attention(f: torch.Tensor) -> list[list[float]]:  # per image: mean_c f^2, unit L2 norm
        maps = []
        for image in f:
            values = [sum(float(image[c, i, j]) ** 2 for c in range(image.shape[0])) / image.shape[0]
                      for i in range(image.shape[1]) for j in range(image.shape[2])]
            norm = math.sqrt(sum(v * v for v in values))
            maps.append([v / norm for v in values])
        return maps

    expected_at = 0.0
    for name in ("a", "b"):
        s, t = naive_attention(student_f[name]), naive_attention(teacher_f[name])
        expected_at += sum((x - y) ** 2 for si, ti in zip(s, t) for x, y in zip(si, ti)) / (len(s) * len(s[0]))
    features = {"student": student_f, "teacher": teacher_f}
    at = create_loss("at", DistillConfig(beta=10.0))(logits, None, labels, features)
    assert at["at"].item() == pytest.approx(expected_at, rel=1e-5)
    assert at["loss"].item() == pytest.approx(ce + 10.0 * expected_at, rel=1e-5)

    def naive_similarity(f: torch.Tensor) -> list[list[float]]:  # rows of A A^T at unit norm
        flat = [image.flatten().tolist() for image in f]
        gram = [[sum(x * y for x, y in zip(u, v)) for v in flat] for u in flat]
        return [[g / math.sqrt(sum(x * x for x in row)) for g in row] for row in gram]

    expected_sp = 0.0
    for name in ("a", "b"):
        s, t = naive_similarity(student_f[name]), naive_similarity(teacher_f[name])
        expected_sp += sum((x - y) ** 2 for si, ti in zip(s, t) for x, y in zip(si, ti)) / 9
    sp = create_loss("sp", DistillConfig(beta=2.0))(logits, None, labels, features)
    assert sp["sp"].item() == pytest.approx(expected_sp, rel=1e-5)
    assert sp["loss"].item() == pytest.approx(ce + 2.0 * expected_sp, rel=1e-5)
    resnet = create_model("resnet20", 10)
    assert stage_outputs(resnet) == ("layer1", "layer2", "layer3")
    assert create_loss("at").feature_layers(resnet) == ("layer1", "layer2", "layer3")
    assert create_loss("sp").feature_layers(resnet) == ("layer3",)
    assert create_loss("at", DistillConfig(layers=("layer2.0",))).feature_layers(resnet) == ("layer2.0",)


@pytest.mark.parametrize("kd", ["at", "sp"])
def test_feature_kd_trains_from_the_command_line(kd: str, tmp_path: Path, tiny_folder: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    teacher = tmp_path / "t"
    data = ["--data", str(tiny_folder), "--batch-size", "12", "--no-progress"]
    assert main(["teacher", *data, "--arch", "resnet20", "--epochs", "1", "--out", str(teacher)]) == 0
    assert main(["train", *data, "--teacher", str(teacher), "--arch", "resnet32", "--init", str(teacher),
                 "--kd", kd, "--aug", "none", "--w-bits", "4", "--a-bits", "4", "--epochs", "1",
                 "--out", str(tmp_path / "s")]) == 2  # --init of another architecture: one error line
    capsys.readouterr()
    assert main(["train", *data, "--teacher", str(teacher), "--kd", kd, "--aug", "none", "--w-bits", "4",
                 "--a-bits", "4", "--epochs", "1", "--out", str(tmp_path / "s")]) == 0
    line = json.loads((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[0])
    assert line[f"train_{kd}"] > 0 and math.isfinite(line["train_loss"])
    assert main(["train", *data, "--teacher", str(teacher), "--kd", kd, "--kd-layers", "layer9", "--aug", "none",
                 "--epochs", "1", "--out", str(tmp_path / "bad")]) == 2
    assert "has no module 'layer9'" in capsys.readouterr().err


def test_quantizer_epoch_hooks_run_without_the_loop_knowing_the_method(tmp_path: Path, tiny_folder: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """EWGS's Hessian delta arrives through Quantizer.on_epoch_start, called at every epoch's start,
    and is estimated at epochs k, 2k, ... (the authors' schedule: it stays at its start value before)."""
    from daqkd.quant import ewgs
    from daqkd.quant.ewgs import EWGSQuantizer

    calls, sampled, probes, cut = [], [], [], []
    original = EWGSQuantizer.on_epoch_start.__func__
    update = ewgs.update_ewgs_delta

    def spy(cls, model, epoch, sample_batches):
        def recorded(count, max_images):
            batches = sample_batches(count, max_images)
            sampled.append((epoch, count, [len(x) for x, _ in batches]))
            cut.extend(len(x) for x, _ in sample_batches(1, 5))  # the cap applies
            return batches

        original(cls, model, epoch, recorded)
        calls.append((epoch, min(float(m.delta) for m in model.modules() if isinstance(m, EWGSQuantizer))))

    def update_spy(*args, **kwargs):
        probes.append(kwargs["probes"])
        return update(*args, **kwargs)

    monkeypatch.setattr(ewgs, "update_ewgs_delta", update_spy)
    train = load_image_folder(tiny_folder, "train")
    net = quantize_model(create_model("resnet20", 3), QuantConfig("ewgs", 4, 4, ewgs_delta=None, ewgs_delta_every=2,
                                                                  ewgs_hessian_batches=2, ewgs_hessian_probes=3))
    model = NormalizedModel(net, parse_normalization("cifar10"))
    config = TrainConfig(epochs=3, batch_size=12, aug="none", optimizer="adam", lr=1e-4)
    trainer = Trainer(model, create_loss("none"), train, train, config, tmp_path / "run", torch.device("cpu"),
                      {"arch": "resnet20"}, progress=False)
    for m in net.modules():
        if isinstance(m, EWGSQuantizer):
            m.delta.fill_(-1.0)  # a value no Hessian update gives (it clips at 0)
    EWGSQuantizer.on_epoch_start = classmethod(spy)
    try:
        trainer.fit()
    finally:
        EWGSQuantizer.on_epoch_start = classmethod(original)
    assert calls[:2] == [(0, -1.0), (1, -1.0)] and calls[2][0] == 2 and calls[2][1] >= 0
    # the configured sample: 2 whole training batches of 12 and 3 probes, at epoch 2 only
    assert sampled == [(2, 2, [12, 12])] and probes == [3] and cut == [5]
    deltas = [float(m.delta) for m in net.modules() if isinstance(m, EWGSQuantizer)]
    assert len(deltas) == 2 * 18 and all(d >= 0 for d in deltas)  # every delta recomputed


def test_outputs_are_written_atomically_with_the_usual_mode(tmp_path: Path) -> None:
    import os

    from daqkd.checkpoint import save_checkpoint
    from daqkd.rundir import atomic_path, write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "m.safetensors", torch.nn.Linear(2, 2), {"arch": "x"})
        with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    finally:
        os.umask(old)
    assert {p.name for p in tmp_path.iterdir()} == {"a.json", "m.safetensors"}  # no temp file, no b.json
    for name in ("a.json", "m.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_class_names_must_match_the_checkpoint(tmp_path: Path, tiny_folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_folder, renamed)
    for split in ("train", "test"):  # same count, other names: class_2 becomes a_class (sorted first)
        (renamed / split / "class_2").rename(renamed / split / "a_class")
    capsys.readouterr()
    for command in (["eval", str(run)], ["train", "--teacher", str(run), "--out", str(tmp_path / "s"), "--aug", "none"],
                    ["rank", "--weights", str(run), "--augs", "none"]):
        assert main([*command, "--data", str(renamed)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "its class 0 is 'class_0', the data's 'a_class'" in err[0], err
    assert not (tmp_path / "s").exists()


def test_ctrl_c_prints_one_line_and_resume_alone_finishes_the_run(tmp_path: Path, tiny_folder: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from daqkd.train import Trainer

    args = ["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "2", "--batch-size", "12",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    step = Trainer._step

    def interrupt_in_epoch_two(self, x, targets):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return step(self, x, targets)

    monkeypatch.setattr(Trainer, "_step", interrupt_in_epoch_two)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == (f"daqkd: interrupted: {tmp_path / 'cut'} keeps its last checkpoint (epoch "
                                        f"end or --save-every step); continue with: daqkd teacher --resume --out "
                                        f"{tmp_path / 'cut'}"), err
    monkeypatch.setattr(Trainer, "_step", step)
    assert main(["teacher", "--resume", "--out", str(tmp_path / "cut"), "--no-progress"]) == 0  # no --arch needed
    from daqkd.loading import load_model

    whole, cut = load_model(tmp_path / "whole")[0].state_dict(), load_model(tmp_path / "cut")[0].state_dict()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_sigterm_during_a_checkpoint_write_unwinds_like_ctrl_c(tmp_path: Path, tiny_folder: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A real SIGTERM, delivered while state.pt's temporary file is half written: the default action
    killed the process there (exit 143, no message, state.pt.*.tmp left). Now the write's temporary
    file is deleted, one line says what is kept, and --resume finishes the run exactly."""
    import os
    import signal

    import daqkd.train

    args = ["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "2", "--batch-size", "12",
            "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    save, calls = torch.save, []

    def terminated_mid_write(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:  # epoch 2's state: epoch 1's stays the last good one
            Path(path).write_bytes(b"half a state")
            os.kill(os.getpid(), signal.SIGTERM)
        return save(obj, path, *a, **kw)

    monkeypatch.setattr(daqkd.train.torch, "save", terminated_mid_write)
    capsys.readouterr()
    run = tmp_path / "cut"
    assert main([*args, "--out", str(run)]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"daqkd: terminated (SIGTERM): {run} keeps its last checkpoint (epoch end or --save-every "
                   f"step); continue with: daqkd teacher --resume --out {run}")], err
    assert len(calls) == 2 and not Path(calls[1]).exists() and not list(run.glob("*.tmp"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main puts the handler back
    monkeypatch.setattr(daqkd.train.torch, "save", save)
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 0
    from daqkd.loading import load_model

    whole, cut = load_model(tmp_path / "whole")[0].state_dict(), load_model(run)[0].state_dict()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("option,value,message", [
    ("--ewgs-delta", "abc", "--ewgs-delta must be a number or 'hessian', got 'abc'"),
    ("--ewgs-hessian-probes", "0", "--ewgs-hessian-probes must be a positive integer, got 0"),
    ("--ewgs-hessian-batches", "-2", "--ewgs-hessian-batches must be a positive integer, got -2"),
    ("--ewgs-delta-every", "0", "--ewgs-delta-every must be a positive integer, got 0"),
])
def test_bad_ewgs_option_is_one_line(option: str, value: str, message: str, tmp_path: Path, tiny_folder: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(tiny_folder), "--teacher", str(tmp_path / "t"), option, value,
                 "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "s").exists()


def test_resume_removes_partial_files_of_a_killed_write(tmp_path: Path, tiny_folder: Path) -> None:
    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    partial = [run / "last.safetensors.k2x9.tmp", run / "state.pt.tmp", run / "config.json.tmp",
               run / "metrics.jsonl.a1b2.tmp"]
    for path in partial:
        path.write_bytes(b"\x00" * 100)  # what a kill during each write leaves
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert not any(path.exists() for path in partial)
    assert not list(run.glob("*.tmp"))


@pytest.mark.parametrize("change,message", [
    ("another optimizer", "does not fit this run"), ("another parameter group", "does not fit this run"),
    ("another model", "does not fit this run"), ("a newer format", "written by a newer daqkd (format 99"),
    ("a damaged format", "damaged daqkd metadata (format is 'two'"),
])
def test_a_state_of_another_layout_is_one_line(change: str, message: str, tmp_path: Path, tiny_folder: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A state.pt from another daqkd version (PACT's alpha had an optimizer of its own once; a newer
    format) or another run: one error line naming the fix, no traceback, the run untouched."""
    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    if change == "another optimizer":
        state["optimizers"].append(state["optimizers"][0])
        state["schedulers"].append(state["schedulers"][0])
    elif change == "another parameter group":
        groups = state["optimizers"][0]["param_groups"]
        groups.append({**groups[0], "params": []})
    elif change == "another model":
        state["model"].pop(next(iter(state["model"])))
    elif change == "a damaged format":
        state["format"] = "two"
    else:
        assert state["format"] == 2
        state["format"] = 99
    torch.save(state, run / "state.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("daqkd: error:") and message in err, err
    assert ("upgrade daqkd" if change == "a newer format" else "start a new run directory") in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_every_option_has_help_and_torch_compile_noise_is_gone() -> None:
    import argparse
    import subprocess
    import sys

    from daqkd.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        undocumented = [a.option_strings or [a.dest] for a in command._actions if not a.help]
        assert not undocumented, (name, undocumented)
    probe = "import daqkd, logging; print(logging.getLogger('torch.utils.cpp_extension').getEffectiveLevel())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "40" and "CUDA_HOME" not in out.stderr


@pytest.mark.parametrize("spec", ["nan,0.5,0.5:0.2,0.2,0.2", "0.5,0.5,0.5:inf,0.2,0.2"])
def test_non_finite_normalization_is_refused(spec: str) -> None:
    with pytest.raises(DaqkdError, match="finite"):
        parse_normalization(spec)


def test_integer_or_nan_weights_and_empty_test_classes(tmp_path: Path, tiny_folder: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    model = create_model("resnet20", 3)
    state = model.state_dict()
    torch.save({**state, "conv1.weight": state["conv1.weight"].round().to(torch.int64)}, tmp_path / "int.pt")
    torch.save({**state, "linear.bias": torch.full((3,), float("nan"))}, tmp_path / "nan.pt")
    foreign = ["--arch", "resnet20", "--normalize", "cifar10", "--data", str(tiny_folder)]
    for name, message in (("int.pt", "holds torch.int64 values"), ("nan.pt", "NaN or infinite")):
        assert main(["eval", str(tmp_path / name), *foreign]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    torch.save(state, tmp_path / "ok.pt")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_folder, partial)
    shutil.rmtree(partial / "test" / "class_1")  # no test images of class_1
    assert main(["eval", str(tmp_path / "ok.pt"), "--arch", "resnet20", "--normalize", "cifar10", "--data",
                 str(partial), "--out", str(tmp_path / "e.json")]) == 0
    assert "class_1                 n/a (no test images)" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["per_class_top1"]["class_1"] is None


def test_output_paths_are_checked_before_the_work(tmp_path: Path, tiny_folder: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    (tmp_path / "file").write_text("x")
    capsys.readouterr()
    cases = [
        (["rank", "--weights", str(run), "--augs", "none", "--out", str(tmp_path)], "is a directory: pass a file"),
        (["eval", str(run), "--out", str(tmp_path / "file" / "e.json")], "lies below"),
        (["teacher", "--arch", "resnet20", "--out", str(tmp_path / "file")], "is a file: pass a directory"),
        (["train", "--teacher", str(run), "--out", str(tmp_path / "file" / "s")], "lies below"),
        (["sweep", "--teacher", str(run), "--augs", "none", "--out", str(tmp_path / "file")], "is a file"),
    ]
    for args, message in cases:
        assert main([*args, "--data", str(tiny_folder)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.glob("**/*.tmp"))


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(tmp_path: Path, tiny_folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import daqkd.checkpoint

    real_save = daqkd.checkpoint.save_file
    calls = []

    def disk_fills_up(state, path, metadata=None):
        calls.append(path)
        if len(calls) == 3:  # epoch 2's last.safetensors
            with open(path, "wb") as f:
                f.write(b"\x00" * 10)  # part of the file made it
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(state, path, metadata=metadata)

    monkeypatch.setattr(daqkd.checkpoint, "save_file", disk_fills_up)
    run = tmp_path / "t"
    args = ["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "2", "--batch-size", "12",
            "--out", str(run), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "--resume" in err[0], err
    assert not list(run.glob("*.tmp"))  # the partial file is gone
    from daqkd.loading import load_model

    assert load_model(run / "last.safetensors")[1]["epoch"] == 1  # the last good checkpoint stays
    monkeypatch.setattr(daqkd.checkpoint, "save_file", real_save)
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert load_model(run / "last.safetensors")[1]["epoch"] == 2


def test_resume_rejects_changed_options_and_the_wrong_command(tmp_path: Path, tiny_folder: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    config = (run / "config.json").read_text()
    capsys.readouterr()
    for args, message in (
        (["teacher", "--resume", "--out", str(run), "--epochs", "5", "--lr", "0.5"],
         "--epochs 5 (stored 1), --lr 0.5 (stored 0.1) would change the run: drop them"),
        (["teacher", "--resume", "--out", str(run), "--batch-size", "256"],  # the default, but not the stored value
         "--batch-size 256 (stored 12) would change the run: drop it"),
        (["train", "--resume", "--out", str(run)], "is a `daqkd teacher` run: resume it with daqkd teacher --resume"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (run / "config.json").read_text() == config  # nothing on disk changed
    # options that may change on a resume do, and a stored value given again is no change
    assert main(["teacher", "--resume", "--out", str(run), "--eval-every", "3", "--batch-size", "12",
                 "--no-progress"]) == 0


def test_resume_from_another_directory_reads_the_runs_relative_paths(tmp_path: Path, tiny_folder: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tiny_folder.parent)
    run = tmp_path / "t"
    assert main(["teacher", "--data", tiny_folder.name, "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # --data is relative to where the run started, not to here
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 0
    # given again, a path is compared as the folder it names: ../tiny from here is the stored tiny
    assert main(["teacher", "--resume", "--out", str(run), "--data", "../tiny", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["teacher", "--resume", "--out", str(run), "--data", "tiny", "--no-progress"]) == 2  # another folder
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--data 'tiny' (stored 'tiny') would change the run" in err, err


@pytest.mark.parametrize("epoch", [1, 2])
@pytest.mark.parametrize("point", ["before the log line", "after the log line", "after last.safetensors",
                                   "after model.safetensors", "after state.pt"])
def test_a_kill_around_any_write_resumes_to_the_uninterrupted_run(point: str, epoch: int, tmp_path: Path,
                                                                  tiny_folder: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  request: pytest.FixtureRequest) -> None:
    import daqkd.train as train_module

    # every epoch is the best so far, so model.safetensors is written in both: the test top-1 reported
    # is 10 x the epoch (whether a tiny random-init run improves depends on every pixel it sees)
    epoch_of_run: dict[str, int] = {}
    real_epoch, real_evaluate = Trainer._train_epoch, train_module.evaluate

    def train_epoch(self):
        epoch_of_run["now"] = self.epoch
        return real_epoch(self)

    def evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "top1": 10.0 * (epoch_of_run["now"] + 1)}

    rising = pytest.MonkeyPatch()
    request.addfinalizer(rising.undo)  # the test's own monkeypatch is undone half-way
    rising.setattr(Trainer, "_train_epoch", train_epoch)
    rising.setattr(train_module, "evaluate", evaluate)
    whole = small_trainer(tiny_folder, tmp_path / "whole", epochs=2, quantized=True, cumulative_batchnorm=True)
    whole.fit()

    class Killed(BaseException):
        pass

    events: list[str] = []
    real_append, real_save, real_state = train_module.append_history, train_module.save_checkpoint, Trainer.save_state

    def check(event: str) -> None:
        events.append(event)
        if events.count(event) == epoch and event == point:  # in epoch 1 before any state.pt exists
            raise Killed

    def append(run, record):
        check("before the log line")
        real_append(run, record)
        check("after the log line")

    def save(path, model, meta):
        real_save(path, model, meta)
        check(f"after {Path(path).name}")

    def save_state(self):
        real_state(self)
        check("after state.pt")

    monkeypatch.setattr(train_module, "append_history", append)
    monkeypatch.setattr(train_module, "save_checkpoint", save)
    monkeypatch.setattr(Trainer, "save_state", save_state)
    killed = small_trainer(tiny_folder, tmp_path / "killed", epochs=2, quantized=True, cumulative_batchnorm=True)
    assert [h["test_top1"] for h in whole.history] == [10.0, 20.0]
    with pytest.raises(Killed):
        killed.fit()
    monkeypatch.undo()
    again = small_trainer(tiny_folder, tmp_path / "killed", epochs=2, quantized=True, cumulative_batchnorm=True)
    again.resume()
    again.fit()
    expected = whole.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in again.model.state_dict().items())
    assert _log(tmp_path / "killed") == _log(tmp_path / "whole")


def test_ctrl_c_in_rank_and_sweep_and_early_sweep_checks(tmp_path: Path, tiny_folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import daqkd.api
    import daqkd.sweep_runner

    run = tmp_path / "t"
    assert main(["teacher", "--data", str(tiny_folder), "--arch", "resnet20", "--epochs", "1", "--batch-size", "12",
                 "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    # a sweep checks the students' options before its ranking pass, and writes nothing
    assert main(["sweep", "--data", str(tiny_folder), "--teacher", str(run), "--augs", "none", "--w-bits", "9",
                 "--out", str(tmp_path / "sw")]) == 2
    assert "--w-bits must be" in capsys.readouterr().err and not (tmp_path / "sw").exists()
    assert main(["train", "--data", str(tiny_folder), "--teacher", str(run), "--ewgs-delta", "-1",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--ewgs-delta must be >= 0" in capsys.readouterr().err

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(daqkd.api, "rank_candidates", interrupt)
    assert main(["rank", "--data", str(tiny_folder), "--weights", str(run), "--augs", "none", "--no-progress"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["daqkd: interrupted: nothing was written"]
    monkeypatch.setattr(daqkd.sweep_runner, "rank_and_save", interrupt)
    assert main(["sweep", "--data", str(tiny_folder), "--teacher", str(run), "--augs", "none", "--batch-size", "12",
                 "--out", str(tmp_path / "sw"), "--no-progress"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "keeps every finished student" in err[0] and "run the same command again" in err[0]


def test_a_real_full_disk_ends_in_one_line(tmp_path: Path, tiny_folder: Path) -> None:
    """safetensors and torch.save report a failed write with their own exception types: with the
    file size limited by the kernel (RLIMIT_FSIZE), the run still ends in one error line."""
    import subprocess
    import sys

    run = tmp_path / "t"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))\n"
        "from daqkd.cli import main\n"
        f"sys.exit(main(['teacher', '--data', {str(tiny_folder)!r}, '--arch', 'resnet20', '--epochs', '1', "
        f"'--batch-size', '12', '--out', {str(run)!r}, '--no-progress']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    err = [line for line in proc.stderr.strip().splitlines() if not line.startswith("W1")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith("daqkd: error: could not write") and "--resume" in err[0]
    assert not list(run.glob("*.tmp"))
    assert main(["teacher", "--resume", "--out", str(run), "--no-progress"]) == 0


def test_feature_kd_without_usable_layers_is_one_line(tmp_path: Path, tiny_folder: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import daqkd.api

    def no_ranking(*args, **kwargs):
        raise AssertionError("ranked before the student's checks")

    monkeypatch.setattr(daqkd.api, "rank_and_save", no_ranking)  # --aug auto (the default) checks first
    teacher = tmp_path / "vgg"
    data = ["--data", str(tiny_folder), "--batch-size", "12", "--no-progress"]
    assert main(["teacher", *data, "--arch", "vgg8", "--epochs", "1", "--out", str(teacher)]) == 0
    capsys.readouterr()
    for extra, message in ((["--kd", "at", "--aug", "none"], "has no residual stages"),
                           (["--kd", "sp", "--aug", "none"], "pass --kd-layers"),
                           (["--kd", "sp"], "pass --kd-layers"), (["--arch", "vgg99"], "vgg99")):
        assert main(["train", *data, "--teacher", str(teacher), *extra, "--epochs", "1",
                     "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "s").exists()
    assert main(["train", *data, "--teacher", str(teacher), "--train-limit-per-class", "0", "--out",
                 str(tmp_path / "s")]) == 2
    assert "--limit-per-class must be at least 1" in capsys.readouterr().err


def test_attention_transfer_needs_equal_spatial_sizes() -> None:
    from daqkd.distill import DistillConfig

    features = {"student": {"x": torch.ones(2, 4, 8, 8)}, "teacher": {"x": torch.ones(2, 4, 4, 4)}}
    with pytest.raises(DaqkdError, match=r"x is \(8, 8\) in the student but \(4, 4\) in the teacher"):
        create_loss("at", DistillConfig())(torch.zeros(2, 3), None, torch.tensor([0, 1]), features)


def test_resuming_a_run_with_damaged_quant_options_is_one_line(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A hand-edited config.json: the line names the stored option and the file, not a CLI flag the
    resuming command never passed."""
    import json

    run = tmp_path / "edited"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "train", "args": {
        "method": "ewgs", "w_bits": 9, "ewgs_delta": "0", "out": str(run)}}))
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{run / 'config.json'} has damaged daqkd metadata (w_bits must be an integer" in err[0]
    assert "--w-bits" not in err[0] and err[0].endswith("start a new run directory"), err


def test_resuming_a_hessian_ewgs_run_from_before_the_sample_options_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Such a run took 2 x 64 images x 1 probe per delta update; resuming it now would switch to the
    new sample halfway, so it is refused. A run with a fixed delta is not concerned."""
    import json

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"command": "train", "args": {
        "method": "ewgs", "ewgs_delta": "hessian", "out": str(run)}}))
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 batches of <= 64 images x 1 probe" in err[0] and "start a new run" in err[0], err
