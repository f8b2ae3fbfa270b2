"""Label-free quality of an embedding, measured on held-out images: no labels needed.

- alignment (Wang & Isola, ICML 2020, arXiv:2005.10242, Sec. 4.1): E ||f(x) - f(x+)||_2^alpha over
  positive pairs, alpha = 2; here x, x+ are two augmented views of one held-out image. Lower is
  better; 0 when both views map to one point. In [0, 4] for unit features.
- uniformity (same section): log E_{x != y} exp(-t ||f(x) - f(y)||_2^2), t = 2, over the
  unaugmented held-out images. Lower is better; 0 when every image maps to one point, about -4 for
  features spread uniformly over a high-dimensional sphere.
- alignment_ratio: alignment over the mean squared distance between different held-out images,
  E ||f(x) - f(x+)||^2 / E_{x != y} ||f(x) - f(y)||^2. Lower is better; about 1 when two views of
  one image are no closer than two different images. Raw alignment rewards collapse (a random-init
  encoder maps every image near one point: alignment near 0, uniformity near 0); the ratio does
  not, so it is the alignment number to compare across encoders.
- augmentation-retrieval top-1 (%): the instance-discrimination task itself (Wu et al. 2018,
  arXiv:1805.01978, Sec. 3.1): an augmented view of image i is classified by its most similar
  original (cosine) among all held-out originals; the share of views that retrieve i.

Views come from the training augmentation (`BatchAugment`) driven by CPU generators seeded from
`seed`, so the numbers are reproducible and both encoders compared see the same views.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

import torch
from torch import Tensor, nn
from torchvision.transforms import v2

from instdisc.data.augment import BatchAugment, eval_transform
from instdisc.data.decode import decode_rgb
from instdisc.data.prepared import SplitData
from instdisc.evaluate.knn import compute_features

METRICS = ("alignment", "alignment_ratio", "uniformity", "retrieval_top1")
# What "beats random init" compares: raw alignment is reported, not compared, since it rewards
# collapse (a random init scores near 0 on every healthy run; alignment_ratio is the fair one).
COMPARED = ("alignment_ratio", "uniformity", "retrieval_top1")
COLLAPSED = 1e-9  # mean squared pair distance below which an embedding is one point
LOWER_IS_BETTER = {"alignment": True, "alignment_ratio": True, "uniformity": True,
                   "retrieval_top1": False, "knn_top1": False}


def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> float:
    """E ||x_i - y_i||_2^alpha over rows: x, y (N, D) are features of positive pairs."""
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x and y must be non-empty (N, D) of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    return (x.double() - y.double()).norm(dim=1).pow(alpha).mean().item()


def uniformity(x: Tensor, t: float = 2.0, chunk_size: int = 1024) -> float:
    """log of the mean of exp(-t ||x_i - x_j||^2) over pairs i != j of the rows of x (N, D).

    Computed `chunk_size` rows at a time with a running logsumexp (no (N, N) matrix held);
    nan for fewer than two rows.
    """
    n = x.shape[0]
    if n < 2:
        return float("nan")
    x = x.double()
    parts = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d2 = torch.cdist(x[start:stop], x).pow(2)                         # (c, N)
        rows = torch.arange(stop - start, device=x.device)                # (c,)
        d2[rows, rows + start] = math.inf                                 # drop i == j
        parts.append(torch.logsumexp(-t * d2, dim=1))                     # (c,)
    return (torch.logsumexp(torch.cat(parts), dim=0) - math.log(n * (n - 1))).item()


def mean_pair_distance(x: Tensor) -> float:
    """E_{i != j} ||x_i - x_j||^2 over the rows of x (N, D), in closed form:
    (2 N sum_i ||x_i||^2 - 2 ||sum_i x_i||^2) / (N (N - 1)). nan for fewer than two rows."""
    n = x.shape[0]
    if n < 2:
        return float("nan")
    x = x.double()
    total = 2 * n * x.pow(2).sum() - 2 * x.sum(dim=0).pow(2).sum()
    return max(total.item(), 0.0) / (n * (n - 1))


def retrieval_top1(originals: Tensor, views: Tensor, chunk_size: int = 1024) -> float:
    """% of rows i of `views` (N, D) whose most similar row of `originals` (N, D) is row i."""
    if originals.shape != views.shape or originals.shape[0] == 0:
        raise ValueError(f"originals and views must be non-empty (N, D) of one shape, got "
                         f"{tuple(originals.shape)} and {tuple(views.shape)}")
    hits = 0
    for start in range(0, views.shape[0], chunk_size):
        sims = views[start:start + chunk_size] @ originals.t()            # (c, N)
        own = torch.arange(start, start + sims.shape[0], device=sims.device)  # (c,)
        hits += int((sims.argmax(dim=1) == own).sum())
    return 100.0 * hits / views.shape[0]


def heldout_images(split: SplitData, count: int, seed: int, image_size: int,
                   resize: int | None) -> Tensor:
    """uint8 (M, 3, H, W) on the CPU: M = min(count, N) images of `split`, a seeded subset in
    index order. File-backed images are decoded, resized and centre-cropped as for evaluation
    (`loaders.eval_file_transform`), then augmented from that crop."""
    n = split.num_items
    picks = torch.arange(n) if count >= n else torch.randperm(
        n, generator=torch.Generator().manual_seed(seed))[:count].sort().values  # (M,)
    if split.storage == "array":
        return split.images[picks].permute(0, 3, 1, 2).contiguous()       # (M, 3, H, W)
    resize = int(image_size / 0.875) if resize is None else resize
    crop = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size),
                       v2.PILToTensor()])
    return torch.stack([crop(decode_rgb(split.paths[i])[0])
                        for i in picks.tolist()])                          # (M, 3, S, S)


def label_free_metrics(encoder: nn.Module, images: Tensor, augment: BatchAugment, *,
                       mean: Sequence[float], std: Sequence[float], batch_size: int,
                       device: torch.device, seed: int) -> dict[str, float]:
    """{"alignment", "alignment_ratio", "uniformity", "retrieval_top1", "images"} of `encoder`
    on uint8 `images`.

    View 1 (generator seed) serves alignment and retrieval, view 2 (seed + 1) alignment; the
    encoder runs in eval mode, as for kNN.
    """
    n = images.shape[0]
    originals = compute_features(encoder, _batches(images, batch_size, device, mean, std),
                                 n, device, progress=False)                # (M, D)
    views = [compute_features(encoder, _batches(images, batch_size, device, mean, std, augment,
                                                seed + i), n, device, progress=False)
             for i in range(2)]                                            # 2 x (M, D)
    align = alignment(views[0], views[1])
    spread = mean_pair_distance(originals)
    ratio = align / spread if spread > COLLAPSED else math.nan           # 0 / 0 when collapsed
    return {"alignment": align, "alignment_ratio": ratio,
            "uniformity": uniformity(originals),
            "retrieval_top1": retrieval_top1(originals, views[0]), "images": n}


def is_better(name: str, trained: float, baseline: float) -> bool:
    """Whether `trained` is strictly better than `baseline` on metric `name` (LOWER_IS_BETTER)."""
    return bool(trained < baseline if LOWER_IS_BETTER[name] else trained > baseline)


def agreement_with_knn(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Spearman rank correlation, across monitored epochs (`rows`), of each label-free metric
    with `knn_top1`; metrics are signed so that better is larger, so +1 means the metric improved
    exactly when kNN did. nan for a metric with fewer than 3 rows where both are finite, or a
    constant column."""
    out = {}
    for name in METRICS:
        pairs = np.array([(row[name], row["knn_top1"]) for row in rows
                          if name in row and math.isfinite(row[name])
                          and math.isfinite(row.get("knn_top1", math.nan))])  # (E, 2)
        if len(pairs) < 3:
            out[name] = math.nan
            continue
        sign = -1.0 if LOWER_IS_BETTER[name] else 1.0
        ranks = np.stack([_ranks(sign * pairs[:, 0]), _ranks(pairs[:, 1])])  # (2, E)
        if ranks.std(axis=1).min() == 0:
            out[name] = math.nan
            continue
        out[name] = float(np.corrcoef(ranks)[0, 1])
    return out


def monitor_titles(agreement: Mapping[str, float]) -> dict[str, str]:
    """Subplot titles of the monitor figure: the metric, which way is better, and its
    `agreement_with_knn` value when finite."""
    titles = {"knn_top1": "knn_top1 (higher is better)"}
    for name in METRICS:
        way = "lower" if LOWER_IS_BETTER[name] else "higher"
        rho = agreement.get(name, math.nan)
        titles[name] = f"{name} ({way} is better)" + (
            f"\nrank corr. with kNN {rho:+.2f}" if math.isfinite(rho) else "")
    return titles


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..E of `values` (E,), ties sharing their mean rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _batches(images: Tensor, batch_size: int, device: torch.device, mean: Sequence[float],
             std: Sequence[float], augment: BatchAugment | None = None,
             seed: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """(normalised float (B, 3, H, W), indices (B,)) on `device`: augmented if `augment`."""
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device)               # (B, 3, H, W) uint8
        x = eval_transform(batch, None, mean, std) if augment is None else augment(batch,
                                                                                   generator)
        yield x, torch.arange(start, start + batch.shape[0], device=device)
