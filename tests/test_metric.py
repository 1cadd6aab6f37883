"""The streaming metric against hand computations and a naive two-pass reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from daqkd.metric import DAStatistics, score, variance_standard_error


def entropy(p: list[float]) -> float:
    return -sum(v * math.log(v) for v in p if v > 0)


def test_hand_computed_two_classes() -> None:
    # class 0: P = (0.8, 0.2), (0.4, 0.6); class 1: P = (0.1, 0.9)
    probs = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], dtype=torch.float64)
    stats = DAStatistics(2, group_size=1)
    stats.update(probs.log(), torch.tensor([0, 0, 1]))
    out = stats.compute()
    # centroids Q_0 = (0.6, 0.4), Q_1 = (0.1, 0.9); label shares 2/3 and 1/3
    mean_entropy = (entropy([0.8, 0.2]) + entropy([0.4, 0.6]) + entropy([0.1, 0.9])) / 3
    cmi = 2 / 3 * entropy([0.6, 0.4]) + 1 / 3 * entropy([0.1, 0.9]) - mean_entropy
    assert out["cmi"] == pytest.approx(cmi, abs=1e-12)
    assert out["cmi"] == pytest.approx(0.0575374, abs=1e-6)  # worked out on paper
    assert out["centroid_ce"] == pytest.approx((-math.log(0.6) - math.log(0.9)) / 2, abs=1e-12)
    assert out["ce"] == pytest.approx((-math.log(0.8) - math.log(0.4) - math.log(0.9)) / 3, abs=1e-12)
    assert out["accuracy"] == pytest.approx(2 / 3)
    # groups of one sample: std over samples of P, per class, averaged
    expected_std = torch.tensor([0.8, 0.4, 0.1], dtype=torch.float64).std().item()  # both classes have the same spread
    assert out["variance"] == pytest.approx(expected_std, abs=1e-12)


def naive(logits: torch.Tensor, targets: torch.Tensor, k: int) -> dict[str, float]:
    """Two passes: centroids first, then per-sample terms, with explicit loops over classes."""
    p = torch.softmax(logits.double(), dim=1)
    t = targets.double() if targets.ndim == 2 else torch.nn.functional.one_hot(targets, k).double()
    n = len(p)
    centroids, masses = [], []
    for y in range(k):
        m = t[:, y].sum()
        masses.append(m)
        centroids.append((t[:, y:y + 1] * p).sum(0) / m)
    h_p = [-(p[i] * p[i].log()).sum() for i in range(n)]
    cmi = sum(masses[y] / n * -(centroids[y] * centroids[y].log()).sum() for y in range(k)) - sum(h_p) / n
    out = {
        "cmi": float(cmi),
        "centroid_ce": float(sum(-centroids[y][y].log() for y in range(k)) / k),
        "ce": float(sum(-(t[i] * p[i].log()).sum() for i in range(n)) / n),
    }
    if targets.ndim == 1:
        kl = sum((p[i] * (p[i].log() - centroids[int(targets[i])].log())).sum() for i in range(n)) / n
        out["mean_kl"] = float(kl)
    return out


@pytest.mark.parametrize("soft", [False, True])
def test_streaming_equals_naive_two_pass(soft: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, k = 300, 7
    logits = 3 * torch.randn(n, k, generator=g)
    if soft:
        targets = torch.softmax(2 * torch.randn(n, k, generator=g), dim=1)
    else:
        targets = torch.randint(0, k, (n,), generator=g)
    stats = DAStatistics(k, group_size=50)
    for start in range(0, n, 64):
        stats.update(logits[start:start + 64], targets[start:start + 64])
    out, ref = stats.compute(), naive(logits, targets, k)
    for key in ("cmi", "centroid_ce", "ce"):
        assert out[key] == pytest.approx(ref[key], abs=1e-6)
    if not soft:
        assert out["cmi"] == pytest.approx(ref["mean_kl"], abs=1e-6)


def test_variance_equals_naive_groups_and_pairing() -> None:
    g = torch.Generator().manual_seed(2)
    logits, paired = torch.randn(230, 5, generator=g), torch.randn(230, 5, generator=g)
    labels = torch.randint(0, 5, (230,), generator=g)
    stats = DAStatistics(5, group_size=40)
    stats.update(logits, labels)
    p = torch.softmax(logits.double(), 1)
    expected = p[:200].view(5, 40, 5).mean(1).std(0).mean()  # the last 30 samples: incomplete group
    assert stats.compute()["variance"] == pytest.approx(float(expected), abs=1e-12)

    stats = DAStatistics(5, group_size=40)
    stats.update(logits, labels, paired_logits=paired)
    q = torch.softmax(paired.double(), 1)
    groups = torch.cat([p[:200].view(5, 40, 5), q[:200].view(5, 40, 5)], dim=1)  # 80 vectors a group
    assert stats.compute()["variance"] == pytest.approx(float(groups.mean(1).std(0).mean()), abs=1e-12)


def test_variance_needs_two_groups() -> None:
    stats = DAStatistics(3, group_size=10)
    stats.update(torch.randn(15, 3), torch.randint(0, 3, (15,)))
    assert math.isnan(stats.compute()["variance"])


def test_invariant_to_batch_size() -> None:
    g = torch.Generator().manual_seed(3)
    logits, labels = torch.randn(500, 6, generator=g), torch.randint(0, 6, (500,), generator=g)
    results = []
    for batch in (1, 7, 64, 500):
        stats = DAStatistics(6, group_size=30)
        for start in range(0, 500, batch):
            stats.update(logits[start:start + batch], labels[start:start + batch])
        results.append(stats.compute())
    for other in results[1:]:
        for key, value in results[0].items():
            assert other[key] == pytest.approx(value, abs=1e-9), key


def test_split_then_merge_equals_one_pass() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(400, 4, generator=g)
    soft = torch.softmax(torch.randn(400, 4, generator=g), 1)
    whole = DAStatistics(4, group_size=25)
    whole.update(logits, soft)
    left, right = DAStatistics(4, group_size=25), DAStatistics(4, group_size=25)
    left.update(logits[:150], soft[:150])  # the cut is a multiple of the group size
    right.update(logits[150:], soft[150:])
    merged = left.merge(right).compute()
    for key, value in whole.compute().items():
        assert merged[key] == pytest.approx(value, abs=1e-9), key


def test_cmi_nonnegative_and_zero_for_identical_class_predictions() -> None:
    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        stats = DAStatistics(5)
        targets = (
            torch.softmax(torch.randn(64, 5, generator=g), 1) if trial % 2 else torch.randint(0, 5, (64,), generator=g)
        )
        stats.update(4 * torch.randn(64, 5, generator=g), targets)
        assert stats.compute()["cmi"] >= -1e-12
    labels = torch.arange(4).repeat(10)
    per_class = torch.randn(4, 4, generator=g)
    stats = DAStatistics(4)
    stats.update(per_class[labels], labels)  # every sample of a class predicts the same
    assert stats.compute()["cmi"] == pytest.approx(0.0, abs=1e-12)
    noisy = DAStatistics(4)
    noisy.update(per_class[labels] + torch.randn(40, 4, generator=g), labels)
    assert noisy.compute()["cmi"] > 1e-3


def test_absent_classes_are_ignored() -> None:
    stats = DAStatistics(5)
    stats.update(torch.log(torch.tensor([[0.7, 0.3, 0, 0, 0], [0.2, 0.8, 0, 0, 0]]) + 1e-12), torch.tensor([0, 1]))
    out = stats.compute()
    assert out["centroid_ce"] == pytest.approx((-math.log(0.7) - math.log(0.8)) / 2, abs=1e-6)


def test_score_variants() -> None:
    figures = {"centroid_ce": 0.5, "ce": 1.5, "cmi": 0.25, "authors_cmi": 0.75}
    assert score(figures) == pytest.approx(0.25)
    assert score(figures, "paper", cmi_weight=2.0) == pytest.approx(0.0)
    assert score(figures, "sample") == pytest.approx(1.25)
    assert score(figures, "authors") == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown score"):
        score(figures, "bogus")


def _shard_and_reduce(rank: int, store: str, out: str) -> None:
    """One of two gloo processes: its interleaved half of ALL_LOGITS, then all_reduce."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        logits, targets, blocks = _two_process_data()
        stats = DAStatistics(3, group_size=4, blocks=4)
        stats.update(logits[rank::2], targets[rank::2], block_ids=blocks[rank::2])
        stats.all_reduce()
        if rank == 0:
            torch.save({"figures": stats.compute(), "loo": stats.jackknife()}, out)
    finally:
        dist.destroy_process_group()


def _two_process_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    return logits, torch.randint(0, 3, (40,), generator=generator), torch.arange(40) // 10  # 4 blocks of 10


def test_two_processes_reduce_to_the_single_process_statistics(tmp_path) -> None:
    # each process sees every other image; after all_reduce the figures and every leave-one-block-out
    # value equal one process's over all 40 (the variance's groups are per process: not compared)
    import torch.multiprocessing as mp

    mp.spawn(_shard_and_reduce, args=(str(tmp_path / "store"), str(tmp_path / "out.pt")), nprocs=2)
    reduced = torch.load(tmp_path / "out.pt", weights_only=True)
    logits, targets, blocks = _two_process_data()
    single = DAStatistics(3, group_size=4, blocks=4)
    single.update(logits, targets, block_ids=blocks)
    expected = single.compute()
    for key in ("cmi", "centroid_ce", "ce", "accuracy", "images"):
        assert reduced["figures"][key] == pytest.approx(expected[key], rel=1e-12), key
    expected_loo = single.jackknife()
    assert set(reduced["loo"]) == set(expected_loo)
    for key, values in expected_loo.items():
        assert values.shape == (4,) and torch.allclose(reduced["loo"][key], values, rtol=1e-12, atol=0), key


def authors_reference(p1: torch.Tensor, y1: torch.Tensor, p2: torch.Tensor, y2: torch.Tensor, soft: bool) -> float:
    """The authors' computation written out: centroids from pass 1, mean KL(P_x || t_x C) on pass 2.
    Under CutMix their code builds C = einsum("bi,bj->ij", p, y) / (label mass of the row index)."""
    if soft:
        centroids = torch.einsum("bi,bj->ij", p1, y1) / y1.sum(0)[:, None]
    else:
        centroids = torch.stack([p1[y1.argmax(1) == k].mean(0) for k in range(y1.shape[1])])
    mixed = y2 @ centroids
    return float((p2 * (p2.log() - mixed.log())).sum(1).mean())


@pytest.mark.parametrize("soft", [False, True])
def test_authors_variant_equals_written_out_reference(soft: bool) -> None:
    g = torch.Generator().manual_seed(3)
    k, n = 4, 64
    logits1, logits2 = torch.randn(n, k, generator=g) * 2, torch.randn(n, k, generator=g) * 2
    labels1, labels2 = torch.arange(n) % k, torch.randint(0, k, (n,), generator=g)
    if soft:  # CutMix-like soft labels: two classes mixed with a random share
        lam1, lam2 = torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)
        eye = torch.eye(k, dtype=torch.float64)
        t1 = lam1 * eye[labels1] + (1 - lam1) * eye[labels1.roll(1)]
        t2 = lam2 * eye[labels2] + (1 - lam2) * eye[labels2.roll(1)]
    else:
        t1, t2 = labels1, labels2
    first = DAStatistics(k, group_size=8)
    first.update(logits1, t1)
    reference = first.authors_centroids(soft_labels=soft)
    second = DAStatistics(k, group_size=8, reference_centroids=reference)
    for chunk in range(0, n, 24):  # streamed in batches
        second.update(logits2[chunk:chunk + 24], t2[chunk:chunk + 24])
    eye = torch.eye(k, dtype=torch.float64)
    y1 = t1.double() if soft else eye[labels1]
    y2 = t2.double() if soft else eye[labels2]
    expected = authors_reference(torch.softmax(logits1.double(), 1), y1, torch.softmax(logits2.double(), 1), y2, soft)
    assert second.compute()["authors_cmi"] == pytest.approx(expected, abs=1e-12)
    if soft:  # the transposed matrix is not the centroids: its rows do not sum to 1
        assert not torch.allclose(reference.sum(1), torch.ones(k, dtype=torch.float64))


def test_authors_variant_on_its_own_pass_with_one_hot_labels_is_the_cmi() -> None:
    # with one-hot labels the mean KL to the class centroid of the same pass is the CMI
    g = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(40, 3, generator=g), torch.arange(40) % 3
    plain = DAStatistics(3, group_size=4)
    plain.update(logits, labels)
    again = DAStatistics(3, group_size=4, reference_centroids=plain.authors_centroids(soft_labels=False))
    again.update(logits, labels)
    out = again.compute()
    assert out["authors_cmi"] == pytest.approx(out["cmi"], abs=1e-12)


def test_variance_standard_error_by_hand() -> None:
    # 51 groups: SE bound = variance / sqrt(2 * 50) = variance / 10
    assert variance_standard_error(0.01, 51) == pytest.approx(0.001)
    assert variance_standard_error(0.01, 1) is None
    assert variance_standard_error(float("nan"), 10) is None
