"""Noise-contrastive estimation for non-parametric instance discrimination.

Wu et al. 2018, arXiv:1805.01978, Sec. 3.2. Notation (paper -> code):
  v = f_theta(x) the current feature (`features`), v_i the bank row of image i, tau (`temperature`),
  n images, m noise samples per positive, P_n = 1/n uniform noise,
  P(i|v) = exp(v_i . v / tau) / Z                                            (Eq. 4)
  h(i, v) = P(i|v) / (P(i|v) + m P_n(i))                                     (Eq. 5)
  J_NCE = -E_{P_d}[log h(i, v)] - m E_{P_n}[log(1 - h(i, v'))]               (Eq. 6)
  Z ~= n E_j[exp(v_j . f / tau)], a Monte-Carlo estimate over the noise rows (Eq. 7): every step
  by default, or (the paper's recipe) once from the first batches and then fixed.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from instdisc.memory_bank import MemoryBank, all_gather_rows, distributed_world_size

log = logging.getLogger(__name__)

GATHER_FRACTION = 8  # bank_logits: one matmul over the whole bank when K * 8 >= n


def nce_loss(logits: Tensor, log_z: Tensor, num_items: int) -> Tensor:
    """NCE, uniform noise P_n = 1/n, in log space. logits: (B, 1+m) = v.f/tau, column 0 positive."""
    log_p = logits - log_z  # log P(i|v), (B, 1+m)
    log_m_pn = math.log((logits.shape[1] - 1) / num_items)  # log(m * P_n), a constant
    log_denom = torch.logaddexp(log_p, torch.full_like(log_p, log_m_pn))  # log(P + m*P_n), (B, 1+m)
    log_h_pos = log_p[:, 0] - log_denom[:, 0]  # log h(i, v), (B,)
    log_1m_h_neg = (log_m_pn - log_denom[:, 1:]).sum(dim=1)  # sum_j log(1 - h(j, v)), (B,)
    return -(log_h_pos + log_1m_h_neg).mean()


def estimate_log_z(noise_logits: Tensor, num_items: int) -> Tensor:
    """Monte-Carlo log Z = log(n * mean_j exp(v_j . f / tau)) over every entry of `noise_logits`.

    Eq. 7 of arXiv:1805.01978 with the expectation over uniformly drawn rows j: pass the noise
    columns only (B, m); the positive column is not a uniform draw and would bias Z upwards.
    """
    return torch.logsumexp(noise_logits.flatten(), dim=0) - math.log(noise_logits.numel() / num_items)


def sample_negatives(indices: Tensor, num_items: int, m: int) -> Tensor:
    """m noise rows per positive, uniform over {0..n-1} minus the row's own index. (B,) -> (B, m).

    Draws from {0..n-2} and shifts values >= the positive up by one: an exact uniform over the
    n-1 other images. Uses the global torch RNG on `indices.device`.
    """
    draws = torch.randint(0, num_items - 1, (indices.shape[0], m), device=indices.device)  # (B, m)
    return draws + (draws >= indices.unsqueeze(1)).long()  # (B, m)


def bank_logits(features: Tensor, bank: Tensor, rows: Tensor, temperature: float) -> Tensor:
    """v_j . f / tau for the bank rows `rows`, in float32 even under autocast (1/tau magnifies
    rounding). features: (B, D); bank: (n, D) detached; rows: (B, K) int -> (B, K).

    When K is a sizeable fraction of n (CIFAR-10: m = 4096 of n = 50,000 or fewer), one
    (B, D) x (D, n) matmul and a gather beat copying the (B, K, D) rows out of the bank; for
    ImageNet-sized n the rows are gathered. Both give the same dot products.
    """
    with torch.autocast(features.device.type, enabled=False):
        f = features.float()
        if rows.shape[1] * GATHER_FRACTION >= bank.shape[0]:
            dots = (f @ bank.float().T).gather(1, rows)  # (B, n) -> (B, K)
        else:
            dots = torch.bmm(bank.float()[rows], f.unsqueeze(2)).squeeze(2)  # (B, K)
    return dots / temperature  # (B, K)


Z_ESTIMATES = ("auto", "batch", "row", "fixed")
ROW_MIN_NEGATIVES = 256  # z_estimate "auto": per-sample Z from m >= this many noise rows, else batch


class NCELoss(nn.Module):
    """J_NCE with noise rows from the memory bank (arXiv:1805.01978, Sec. 3.2, Eq. 4-7).

    forward(features (B, D) unit norm, indices (B,)) -> scalar. The bank rows are buffers, so the
    gradient flows only into `features`. Z (detached, a constant to the gradient) lives in the
    buffer `log_z`; it is always estimated from the noise columns only (Eq. 7):

    - `z_estimate="auto"` (default): "row" when m >= ROW_MIN_NEGATIVES (enough noise samples
      for a per-sample estimate), else "batch" (B * m samples pooled). On the CIFAR-10 subset
      (docs/fidelity.md): m = 4096 reaches 40.1 kNN with "row" (softmax 40.7), 38.3 with "batch".
    - `z_estimate="batch"`: every step, log Z = log(n * mean exp(logits)) over this
      batch's B*m noise logits, pooled over DDP ranks. With `z_momentum` mu > 0 the estimate is
      smoothed, Z <- mu * Z + (1 - mu) * Z_batch (log space), starting from the first batch.
      The features move fast early on (the exact Z falls ~20x during the first epochs of a
      CIFAR-10 run), so an estimate that follows the current features is what lets NCE learn.
    - `z_estimate="row"`: every step, one estimate per sample from its own m noise logits,
      Z(v) ~= n * mean_j exp(v_j . v / tau): Z depends on v (Eq. 4), and a per-sample estimate
      makes NCE's push away from the noise rows sum to ~1 for every sample, as the softmax's
      does (large m only: with m = 1 it degenerates to a pairwise logistic loss). `log_z` then
      holds the batch estimate, for logging; `z_momentum` is not used.
    - `z_estimate="fixed"`: the paper's recipe: the mean over the first `z_batches` batches
      (running logsumexp `z_lse` and count `z_count`), then fixed and logged once; with
      `z_momentum` > 0 it keeps moving afterwards as the EMA above.

    Under DDP every batch statistic is pooled over all ranks, so Z is identical everywhere. The
    buffers are in the state_dict.
    """

    def __init__(self, bank: MemoryBank, num_negatives: int, temperature: float,
                 z_batches: int = 1, z_momentum: float = 0.0, z_estimate: str = "auto") -> None:
        super().__init__()
        if bank.num_items < 2:
            raise ValueError(f"NCE needs at least 2 bank rows, got {bank.num_items}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if z_batches < 1:
            raise ValueError(f"z_batches must be >= 1, got {z_batches}")
        if not 0.0 <= z_momentum < 1.0:
            raise ValueError(f"z_momentum must be in [0, 1), got {z_momentum}")
        if z_estimate not in Z_ESTIMATES:
            raise ValueError(f"z_estimate must be one of {list(Z_ESTIMATES)}, got {z_estimate!r}")
        self.bank = bank
        self.num_negatives = num_negatives  # m
        self.temperature = temperature  # tau
        self.z_batches = z_batches
        self.z_momentum = z_momentum
        if z_estimate == "auto":
            z_estimate = "row" if num_negatives >= ROW_MIN_NEGATIVES else "batch"
        self.z_estimate = z_estimate  # resolved: "batch", "row" or "fixed"
        self.register_buffer("log_z", torch.tensor(float("nan")))  # () log Z in use, nan until set
        self.register_buffer("z_lse", torch.tensor(float("-inf")))  # () logsumexp of seen logits
        self.register_buffer("z_count", torch.tensor(0, dtype=torch.long))  # () logits seen
        self.register_buffer("z_batches_seen", torch.tensor(0, dtype=torch.long))  # ()
        self._seen = 0  # host copy of z_batches_seen: no device sync per step
        self.register_load_state_dict_post_hook(NCELoss._sync_host_state)

    @staticmethod
    def _sync_host_state(module: NCELoss, incompatible_keys: object) -> None:
        module._seen = int(module.z_batches_seen)

    @property
    def z_fixed(self) -> bool:
        """True once the paper's estimate is complete (`fixed` mode, first `z_batches` seen)."""
        return self.z_estimate == "fixed" and self._seen >= self.z_batches

    @property
    def z(self) -> float:
        """Z for logging: the value in use (running estimate while estimating), nan before."""
        if self._seen == 0:
            return float("nan")
        if self.z_estimate == "fixed" and not self.z_fixed:
            log_z = float(self.z_lse) - math.log(int(self.z_count)) + math.log(self.bank.num_items)
        else:
            log_z = float(self.log_z)
        return math.exp(log_z) if log_z < 709.0 else float("inf")

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        n = self.bank.num_items
        noise = sample_negatives(indices, n, self.num_negatives)  # (B, m)
        rows = torch.cat([indices.unsqueeze(1), noise], dim=1)  # (B, 1+m), column 0 positive
        logits = bank_logits(features, self.bank.features, rows, self.temperature)  # (B, 1+m)
        log_z = self._update_log_z(logits[:, 1:].detach())  # () or (B, 1) for "row"
        return nce_loss(logits, log_z, n)

    @torch.no_grad()
    def _update_log_z(self, noise_logits: Tensor) -> Tensor:
        """Advance the Z state with this batch's noise logits (B, m); the log Z to use now."""
        if self.z_fixed and self.z_momentum == 0.0:
            return self.log_z
        batch_lse, batch_count = self._pooled_stats(noise_logits)  # (), ()
        log_n = math.log(self.bank.num_items)
        first = self._seen == 0
        if self.z_estimate == "fixed" and not self.z_fixed:  # the paper: pool the first batches
            self.z_lse.copy_(torch.logaddexp(self.z_lse, batch_lse))
            self.z_count.add_(batch_count)
            self._count_batch()
            estimate = self.z_lse - torch.log(self.z_count.to(self.z_lse.dtype)) + log_n  # ()
            if self.z_fixed:
                self.log_z.copy_(estimate)
                log.info("NCE normalisation constant fixed after %d batches: Z = %.6g "
                         "(log Z = %.4f)", self._seen, self.z, float(self.log_z))
            return estimate
        batch_log_z = batch_lse - torch.log(batch_count.to(batch_lse.dtype)) + log_n  # ()
        if self.z_estimate == "row":
            self._count_batch()
            self.log_z.copy_(batch_log_z)
            m = noise_logits.shape[1]
            return torch.logsumexp(noise_logits, dim=1, keepdim=True) - math.log(m) + log_n  # (B, 1)
        if self.z_estimate == "batch":
            self._count_batch()
        mu = self.z_momentum
        if first or mu == 0.0:
            self.log_z.copy_(batch_log_z)
        else:
            self.log_z.copy_(torch.logaddexp(self.log_z + math.log(mu),
                                             batch_log_z + math.log1p(-mu)))
        return self.log_z

    def _count_batch(self) -> None:
        self.z_batches_seen.add_(1)
        self._seen += 1

    def _pooled_stats(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(logsumexp, count) of this batch's logits, pooled over all DDP ranks (rank order)."""
        lse = torch.logsumexp(logits.flatten().to(self.z_lse.dtype), dim=0)  # ()
        count = torch.tensor(logits.numel(), dtype=torch.long, device=logits.device)  # ()
        if distributed_world_size() > 1:
            lse = torch.logsumexp(all_gather_rows(lse.reshape(1)), dim=0)  # ()
            count = all_gather_rows(count.reshape(1)).sum()  # ()
        return lse, count

    def extra_repr(self) -> str:
        return (f"num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"z_estimate={self.z_estimate}, z_batches={self.z_batches}, "
                f"z_momentum={self.z_momentum}")
