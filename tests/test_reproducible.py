"""Same inputs, same bytes: `prepare`, `pretrain` and `export` in two checkouts at different paths
give outputs with the same hashes in dvc.lock (what DVC's cache, run-cache and remotes rely on)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import yaml

from conftest import make_pipeline_repo, run

log = logging.getLogger(__name__)
OUTS = ("data/prepared", "models/encoder.pt", "models/encoder.onnx")
TINY = {"pretrain": {"epochs": 1, "lr_milestones": [], "width": 0.125}}


def locked_hashes(repo) -> dict[str, str]:
    """{out path: md5} of the cached outputs, as DVC recorded them in dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {out["path"]: out["md5"] for stage in lock.values() for out in stage.get("outs", [])
            if out["path"] in OUTS}


def test_two_checkouts_at_different_paths_lock_the_same_output_hashes(tmp_path):
    roots = [tmp_path / "a", tmp_path / "second" / "checkout-b"]
    for root in roots:
        root.mkdir(parents=True)
    repos = [make_pipeline_repo(root, TINY) for root in roots]
    with ThreadPoolExecutor(len(repos)) as pool:  # the two checkouts reproduce side by side
        results = list(pool.map(lambda repo: run(["dvc", "repro", "export"], repo, timeout=600),
                                repos))
    for out in results:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    first, second = (locked_hashes(repo) for repo in repos)
    log.info("locked hashes: %s", first)
    assert set(first) == set(OUTS)
    assert first == second
