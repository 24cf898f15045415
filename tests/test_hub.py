"""The release registry, the download cache (hash check, no-network errors) and checkpoint reading."""

import hashlib
import re

import pytest
import torch

from dpslm_stream import hub
from dpslm_stream.errors import CheckpointError, CheckpointUnavailable, UnknownModel

# The dp-slm README's grid of (k, lambda) pairs, written out independently of the registry.
README_GRID = {
    100: [0, 600, 1500, 3000, 5000, 9000],
    200: [0, 700, 1500, 3000, 5000, 7500],
    500: [0, 600, 1500, 2800, 4500, 7000],
    1000: [0, 600, 1400, 2500, 3800, 6000],
}


def test_registry_knows_every_released_pair_and_codebook():
    expected = {(k, lm) for k, lms in README_GRID.items() for lm in lms}
    assert set(hub.VALID_PAIRS) == expected and len(expected) == 24
    assert set(hub.ULM_1K) == expected and set(hub.ELLAV) == expected
    assert set(hub.ULM_60K) == {(500, 4500)}
    assert sorted(hub.CODEBOOKS) == [100, 200, 500, 1000, 2000]
    for (k, lm), release in hub.ELLAV.items():  # upstream keys k=100 as 0; the file names say 100
        assert f"-k-{k}-lmbda-{lm}-" in release.filename and release.url.endswith(release.filename)
    for (k, lm), release in hub.ULM_1K.items():
        assert release.filename.startswith(f"mistral-ulm-k-{k}-lmbda-{lm}-hours-1k-steps-10k-")
        assert re.fullmatch(r"[a-f0-9]{8}", release.sha256_prefix)
    assert hub.WAVTOKENIZER[600].sha256_prefix is None  # upstream loads these without a hash check


@pytest.mark.parametrize("k,lmbda", [(500, 4400), (300, 0), (100, 4500), ("500", 4500), (500, 4500.5)])
def test_unknown_pair_lists_the_valid_ones(k, lmbda):
    with pytest.raises(UnknownModel, match=r"valid pairs: \(100, 0\)"):
        hub.check_pair(k, lmbda)
    with pytest.raises(UnknownModel):
        hub.ulm_wavlm_layer_11_dpdp_hours_1k_steps_10k(k, lmbda)


def test_unknown_codebook():
    with pytest.raises(UnknownModel, match="valid k"):
        hub.codebook(11, 300)
    with pytest.raises(UnknownModel, match="layer-11"):
        hub.codebook(6, 500)


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path
    torch.hub.set_dir(old)


def _release_for(tmp_path, payload: bytes, good_hash: bool) -> hub.Release:
    src = tmp_path / "upstream.pt"
    src.write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()[:8] if good_hash else "00000000"
    return hub.Release(f"codebook-layer-11-k-7-{digest}.pt", src.as_uri())


def _codebook_bytes(tmp_path, k=7, d=4) -> bytes:
    p = tmp_path / "cb.pt"
    torch.save({"codebook": torch.randn(k, d)}, p)
    return p.read_bytes()


def test_fetch_checks_hash_and_caches_where_torch_hub_does(hub_dir):
    release = _release_for(hub_dir, _codebook_bytes(hub_dir), good_hash=True)
    path = hub.fetch(release, progress=False)
    assert path == hub.checkpoint_dir() / release.filename and path.is_file()
    (hub_dir / "upstream.pt").unlink()  # second call must come from the cache, not the URL
    assert hub.fetch(release, progress=False) == path
    assert hub.codebook(11, 500, path=path).shape == (7, 4)


def test_fetch_rejects_hash_mismatch_and_leaves_no_file(hub_dir):
    release = _release_for(hub_dir, _codebook_bytes(hub_dir), good_hash=False)
    with pytest.raises(CheckpointError, match="failed its check"):
        hub.fetch(release, progress=False)
    assert not (hub.checkpoint_dir() / release.filename).exists()


def test_no_network_names_file_url_and_how_to_prefetch(hub_dir):
    release = hub.Release("codebook-layer-11-k-7-12345678.pt", "http://127.0.0.1:9/nowhere/codebook-layer-11-k-7-12345678.pt")
    with pytest.raises(CheckpointUnavailable) as e:
        hub.fetch(release, progress=False)
    msg = str(e.value)
    assert release.filename in msg and release.url in msg and "dpslm-stream download" in msg


def test_corrupt_truncated_and_missing_checkpoints(tmp_path):
    good = _codebook_bytes(tmp_path)
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    for name in ("trunc.pt", "garbage.pt"):
        with pytest.raises(CheckpointError, match=name):
            hub.codebook(11, 500, path=tmp_path / name)
    with pytest.raises(CheckpointUnavailable, match="not found"):
        hub.codebook(11, 500, path=tmp_path / "missing.pt")
    torch.save({"centroids": torch.randn(3, 2)}, tmp_path / "wrongkey.pt")
    with pytest.raises(CheckpointError, match="codebook"):
        hub.codebook(11, 500, path=tmp_path / "wrongkey.pt")


def test_weights_only_refuses_pickled_code(tmp_path):
    import datetime  # any class outside torch's weights-only allowlist stands in for arbitrary code

    torch.save({"codebook": datetime.date(2025, 1, 1)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        hub.read_checkpoint(tmp_path / "evil.pt")


def test_model_folder_finds_files_by_release_name_up_to_the_hash(tmp_path):
    torch.save({"codebook": torch.randn(100, 8)}, tmp_path / "codebook-layer-11-k-100-abcdef12.pt")
    models = hub.ModelSet(str(tmp_path))
    assert models.codebook(100).shape == (100, 8)
    assert not models.is_random
    with pytest.raises(CheckpointUnavailable, match="codebook-layer-11-k-500"):
        models.codebook(500)
    with pytest.raises(CheckpointUnavailable, match="model folder not found"):
        hub.ModelSet(str(tmp_path / "nope")).codebook(100)
