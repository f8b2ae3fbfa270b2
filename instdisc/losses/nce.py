"""Noise-contrastive estimation for non-parametric instance discrimination.

Wu et al. 2018, arXiv:1805.01978, Sec. 3.2. Notation (paper -> code):
  v = f_theta(x) the current feature (`features`), v_i the bank row of image i, tau (`temperature`),
  n images, m noise samples per positive, P_n = 1/n uniform noise,
  P(i|v) = exp(v_i . v / tau) / Z                                            (Eq. 4)
  h(i, v) = P(i|v) / (P(i|v) + m P_n(i))                                     (Eq. 5)
  J_NCE = -E_{P_d}[log h(i, v)] - m E_{P_n}[log(1 - h(i, v'))]               (Eq. 6)
  Z ~= n E_j[exp(v_j . f / tau)], a Monte-Carlo estimate from the first batches (Eq. 7).
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from instdisc.memory_bank import MemoryBank, all_gather_rows, distributed_world_size

log = logging.getLogger(__name__)


def nce_loss(logits: Tensor, log_z: Tensor, num_items: int) -> Tensor:
    """NCE, uniform noise P_n = 1/n, in log space. logits: (B, 1+m) = v.f/tau, column 0 positive."""
    log_p = logits - log_z  # log P(i|v), (B, 1+m)
    log_m_pn = math.log((logits.shape[1] - 1) / num_items)  # log(m * P_n), a constant
    log_denom = torch.logaddexp(log_p, torch.full_like(log_p, log_m_pn))  # log(P + m*P_n), (B, 1+m)
    log_h_pos = log_p[:, 0] - log_denom[:, 0]  # log h(i, v), (B,)
    log_1m_h_neg = (log_m_pn - log_denom[:, 1:]).sum(dim=1)  # sum_j log(1 - h(j, v)), (B,)
    return -(log_h_pos + log_1m_h_neg).mean()


def estimate_log_z(logits: Tensor, num_items: int) -> Tensor:
    """Monte-Carlo log Z = log(n * mean(exp(logits))) over all entries of `logits` (Eq. 7)."""
    return torch.logsumexp(logits.flatten(), dim=0) - math.log(logits.numel() / num_items)


def sample_negatives(indices: Tensor, num_items: int, m: int) -> Tensor:
    """m noise rows per positive, uniform over {0..n-1} minus the row's own index. (B,) -> (B, m).

    Draws from {0..n-2} and shifts values >= the positive up by one: an exact uniform over the
    n-1 other images. Uses the global torch RNG on `indices.device`.
    """
    draws = torch.randint(0, num_items - 1, (indices.shape[0], m), device=indices.device)  # (B, m)
    return draws + (draws >= indices.unsqueeze(1)).long()  # (B, m)


def bank_logits(features: Tensor, bank_rows: Tensor, temperature: float) -> Tensor:
    """v_j . f / tau for every row, in float32 even under autocast (1/tau magnifies rounding).

    features: (B, D); bank_rows: (B, K, D) detached bank rows -> (B, K).
    """
    with torch.autocast(features.device.type, enabled=False):
        dots = torch.bmm(bank_rows.float(), features.float().unsqueeze(2))  # (B, K, 1)
    return dots.squeeze(2) / temperature  # (B, K)


class NCELoss(nn.Module):
    """J_NCE with noise rows from the memory bank (arXiv:1805.01978, Sec. 3.2, Eq. 4-7).

    forward(features (B, D) unit norm, indices (B,)) -> scalar. The bank rows are buffers, so the
    gradient flows only into `features`. Z lives in the buffer `log_z` (nan until fixed): during
    the first `z_batches` batches the estimate is log(n * mean exp(logits)) over all logits seen so
    far (running logsumexp `z_lse` and count `z_count`, current batch included); then it is fixed
    and logged once. With `z_momentum` mu > 0 it keeps moving afterwards:
    Z <- mu * Z + (1 - mu) * Z_batch, computed in log space. Under DDP every batch statistic is
    pooled over all ranks, so Z is identical everywhere. The buffers are in the state_dict.
    """

    def __init__(self, bank: MemoryBank, num_negatives: int, temperature: float,
                 z_batches: int = 1, z_momentum: float = 0.0) -> None:
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
        self.bank = bank
        self.num_negatives = num_negatives  # m
        self.temperature = temperature  # tau
        self.z_batches = z_batches
        self.z_momentum = z_momentum
        self.register_buffer("log_z", torch.tensor(float("nan")))  # () fixed log Z, nan until set
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
        """True once the first `z_batches` batches have been seen."""
        return self._seen >= self.z_batches

    @property
    def z(self) -> float:
        """Z for logging: the fixed value, the running estimate while estimating, nan before."""
        if self.z_fixed:
            log_z = float(self.log_z)
        elif self._seen > 0:
            log_z = float(self.z_lse) - math.log(int(self.z_count)) + math.log(self.bank.num_items)
        else:
            return float("nan")
        return math.exp(log_z) if log_z < 709.0 else float("inf")

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        n = self.bank.num_items
        noise = sample_negatives(indices, n, self.num_negatives)  # (B, m)
        rows = torch.cat([indices.unsqueeze(1), noise], dim=1)  # (B, 1+m), column 0 positive
        logits = bank_logits(features, self.bank.features[rows], self.temperature)  # (B, 1+m)
        log_z = self._update_log_z(logits.detach())  # ()
        return nce_loss(logits, log_z, n)

    @torch.no_grad()
    def _update_log_z(self, logits: Tensor) -> Tensor:
        """Advance the Z state with this batch's logits (B, 1+m); return the log Z to use now."""
        if self.z_fixed and self.z_momentum == 0.0:
            return self.log_z
        batch_lse, batch_count = self._pooled_stats(logits)  # (), ()
        log_n = math.log(self.bank.num_items)
        if not self.z_fixed:
            self.z_lse.copy_(torch.logaddexp(self.z_lse, batch_lse))
            self.z_count.add_(batch_count)
            self.z_batches_seen.add_(1)
            self._seen += 1
            estimate = self.z_lse - torch.log(self.z_count.to(self.z_lse.dtype)) + log_n  # ()
            if self.z_fixed:
                self.log_z.copy_(estimate)
                log.info("NCE normalisation constant fixed after %d batches: Z = %.6g "
                         "(log Z = %.4f)", self._seen, self.z, float(self.log_z))
            return estimate
        batch_log_z = batch_lse - torch.log(batch_count.to(batch_lse.dtype)) + log_n  # ()
        mu = self.z_momentum
        self.log_z.copy_(torch.logaddexp(self.log_z + math.log(mu), batch_log_z + math.log1p(-mu)))
        return self.log_z

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
                f"z_batches={self.z_batches}, z_momentum={self.z_momentum}")
