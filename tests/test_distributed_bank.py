"""Two gloo ranks on 127.0.0.1: bank updates and the NCE Z estimate stay identical everywhere."""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from instdisc import runtime
from instdisc.losses import NCELoss, estimate_log_z, sample_negatives
from instdisc.memory_bank import MemoryBank

NUM_ITEMS, DIM, NUM_NEGATIVES, TAU = 40, 8, 6, 0.1
SEED, EPOCH = 0, 3
# Different local batches per rank, of different sizes; row 7 appears on both ranks and twice on
# rank 1, so "last occurrence wins" is exercised across the gathered batch.
LOCAL_INDICES = [torch.tensor([0, 7, 12, 3, 30]), torch.tensor([7, 21, 5, 7])]


def local_features(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return F.normalize(torch.randn(len(LOCAL_INDICES[rank]), DIM, generator=generator), dim=1)


def make_bank():
    return MemoryBank(NUM_ITEMS, DIM, momentum=0.5, generator=torch.Generator().manual_seed(0))


def local_logits(bank, rank):
    """The logits rank `rank` computes in NCELoss after training's per-rank reseed, by hand."""
    torch.manual_seed(runtime.rank_seed(SEED, EPOCH, rank))
    indices = LOCAL_INDICES[rank]
    rows = torch.cat([indices[:, None], sample_negatives(indices, NUM_ITEMS, NUM_NEGATIVES)], 1)
    return torch.einsum("bkd,bd->bk", bank.features[rows], local_features(rank)) / TAU


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(rank, world_size, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        bank = make_bank()
        loss_fn = NCELoss(bank, NUM_NEGATIVES, TAU)
        torch.manual_seed(runtime.rank_seed(SEED, EPOCH, rank))  # as TrainData.epoch_batches
        loss_fn(local_features(rank), LOCAL_INDICES[rank])
        bank.update(LOCAL_INDICES[rank], local_features(rank))
        torch.save({"bank": bank.features, "log_z": loss_fn.log_z}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_banks_and_z_are_identical_across_ranks_and_match_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(results[0]["bank"], results[1]["bank"])
    assert torch.equal(results[0]["log_z"], results[1]["log_z"])

    single = make_bank()
    logits = torch.cat([local_logits(single, rank) for rank in range(2)])  # before the update
    single.update(torch.cat(LOCAL_INDICES), torch.cat([local_features(0), local_features(1)]))
    assert torch.equal(results[0]["bank"], single.features)
    noise = logits[:, 1:]  # Z comes from the noise columns, pooled over both ranks
    assert torch.allclose(results[0]["log_z"], estimate_log_z(noise, NUM_ITEMS), rtol=1e-6)
    alone = estimate_log_z(local_logits(make_bank(), 0)[:, 1:], NUM_ITEMS)
    assert not torch.allclose(results[0]["log_z"], alone, rtol=1e-3)  # both ranks contributed
