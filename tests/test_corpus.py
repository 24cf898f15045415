"""`dpslm-stream encode-corpus` on the tiny set: equal to per-file Pipeline.encode, resumable without duplicates,
static shards, both manifest formats, per-file errors; and (with the optional Ray extra) the Ray Data path."""

import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import soundfile as sf

from dpslm_stream import corpus as C
from dpslm_stream import corpus_output
from dpslm_stream.audio import load_audio
from dpslm_stream.cli import main
from dpslm_stream.pipeline import Pipeline, bitrate
from dpslm_stream.tiny import speech_like

PAIR = ["--k", "100", "--lmbda", "600"]
# id -> (sample rate, seconds, seed, extension): nested folders, one 22.05 kHz FLAC among 16 kHz files.
FILES = {
    "a/s1/u1": (16000, 0.9, 1, "wav"),
    "a/s1/u2": (16000, 1.3, 2, "wav"),
    "a/s2/u3": (22050, 1.1, 3, "flac"),
    "b/u4": (16000, 0.7, 4, "wav"),
    "b/u5": (16000, 1.2, 5, "flac"),
    "top": (16000, 1.0, 6, "wav"),
}
IDS = sorted(FILES)


def _write_corpus(root: Path, files=FILES) -> Path:
    for uid, (sr, seconds, seed, ext) in files.items():
        path = root / f"{uid}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, speech_like(seconds, sr, seed=seed), sr)
    (root / "notes.txt").write_text("not audio: skipped by --ext")
    return root


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("corpus") / "data")


@pytest.fixture(scope="module")
def reference(tiny_dir, corpus_dir):
    """Per-file `dpslm-stream encode` results (Pipeline.encode on each file, scored)."""
    pipe = Pipeline(str(tiny_dir), 100, 600)
    out = {}
    for uid, (_, _, _, ext) in FILES.items():
        wav, sr = load_audio(corpus_dir / f"{uid}.{ext}")
        out[uid] = pipe.encode(wav, sr, score=True)
    return out


def _run(*argv) -> int:
    return main(["encode-corpus", *map(str, argv), "--quiet"])


def _rows(out: Path) -> dict:
    rows = C.CorpusOutput(out).read_rows()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicate ids: {[i for i, c in Counter(ids).items() if c > 1]}"
    return {r["id"]: r for r in rows}


def _check_against_reference(out: Path, reference: dict, ids=IDS, scored: bool = True) -> None:
    rows = _rows(out)
    assert sorted(rows) == sorted(ids)
    for uid in ids:
        r, ref = rows[uid], reference[uid]
        assert r["units"] == ref.units and r["durations"] == ref.durations, uid
        assert r["num_frames"] == ref.num_frames and r["seconds"] == pytest.approx(ref.seconds)
        assert (r["k"], r["lmbda"]) == (100, 600)
        if scored:
            assert r["loglikelihood"] == pytest.approx(ref.loglikelihood, rel=1e-5)
        else:
            assert r["loglikelihood"] is None


def _check_text_files(out: Path, reference: dict, ids=IDS) -> None:
    units = (out / "units.txt").read_text().splitlines()
    durations = (out / "durations.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in units] == sorted(ids) == [ln.split()[0] for ln in durations]
    for u_line, d_line in zip(units, durations):
        uid = u_line.split()[0]
        assert [int(x) for x in u_line.split()[1:]] == reference[uid].units
        assert [int(x) for x in d_line.split()[1:]] == reference[uid].durations


@pytest.fixture(scope="module")
def local_out(tiny_dir, corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR) == 0
    return out


def test_folder_equals_per_file_encode(local_out, reference):
    _check_against_reference(local_out, reference)
    _check_text_files(local_out, reference)
    s = json.loads((local_out / "summary.json").read_text())
    total = sum(r.seconds for r in reference.values())
    assert s["count"] == len(IDS) == s["corpus_size"] and s["failed"] == 0 and s["missing"] == 0
    assert s["seconds"] == pytest.approx(total) and s["hours"] == pytest.approx(total / 3600)
    assert s["bitrate"] == pytest.approx(bitrate([reference[i].units for i in IDS], total))
    assert s["random_weights"] is True and (s["k"], s["lmbda"], s["num_neighbors"]) == (100, 600, 5)
    assert s["loglikelihood_total"] == pytest.approx(sum(r.loglikelihood for r in reference.values()), rel=1e-5)
    assert not (local_out / "errors.jsonl").exists()
    parts = C.CorpusOutput(local_out).parts()
    assert parts and all(p.suffix == (".parquet" if C.have_pyarrow() else ".jsonl") for p in parts)


def test_rerun_of_a_finished_job_encodes_nothing(local_out, tiny_dir, corpus_dir, monkeypatch):
    before = (local_out / "units.txt").read_text()
    calls = []
    real = C.encode_utterance
    monkeypatch.setattr(C, "encode_utterance", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert _run(corpus_dir, "--out", local_out, "--models", tiny_dir, *PAIR) == 0
    assert calls == [] and (local_out / "units.txt").read_text() == before


def test_other_settings_into_the_same_out_are_refused(local_out, tiny_dir, corpus_dir, capsys):
    assert _run(corpus_dir, "--out", local_out, "--models", tiny_dir, "--k", "100", "--lmbda", "0") == 1
    assert "other settings" in capsys.readouterr().err


def test_unknown_pair_fails_before_starting(tiny_dir, corpus_dir, tmp_path, capsys):
    assert _run(corpus_dir, "--out", tmp_path / "o", "--models", tiny_dir, "--k", "100", "--lmbda", "4500") == 1
    assert "valid pairs" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_resume_after_a_crash_has_no_duplicate_and_no_gap(tiny_dir, corpus_dir, reference, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = C.encode_utterance
    calls = []

    def crash_after_two(*a, **kw):
        if len(calls) == 2:
            raise RuntimeError("injected crash")
        calls.append(a[1].id)
        return real(*a, **kw)

    monkeypatch.setattr(C, "encode_utterance", crash_after_two)
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--part-size", "5")
    # The pending part was written on the way out; a hard kill would leave at most a temporary file, which is ignored.
    assert sorted(_rows(out)) == sorted(calls) == IDS[:2] and not (out / "units.txt").exists()
    (out / ".part-r00000-of-00001-x-000009.parquet.123.tmp").write_bytes(b"half a part")

    calls.clear()
    monkeypatch.setattr(C, "encode_utterance", lambda *a, **kw: calls.append(a[1].id) or real(*a, **kw))
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--part-size", "2") == 0
    assert calls == IDS[2:]  # only what was missing
    _check_against_reference(out, reference)
    _check_text_files(out, reference)


def test_two_static_shards_cover_the_corpus_exactly(tiny_dir, corpus_dir, reference, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--no-score", "--nshard", "2", "--rank", "1",
                "--part-size", "2") == 0  # fmt: skip
    assert sorted(_rows(out)) == IDS[1::2] and not (out / "units.txt").exists()
    assert "--merge" in capsys.readouterr().out
    assert all("-r00001-of-00002-" in p.name for p in C.CorpusOutput(out).parts())
    # --merge writes what there is and says what is missing.
    assert _run(corpus_dir, "--out", out, "--merge") == 1
    assert json.loads((out / "summary.json").read_text())["missing_ids"] == IDS[0::2]
    # The last shard to finish writes the final files.
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--no-score", "--nshard", "2", "--rank", "0") == 0
    _check_against_reference(out, reference, scored=False)
    _check_text_files(out, reference)
    assert json.loads((out / "summary.json").read_text())["missing"] == 0
    assert _run(corpus_dir, "--out", out, "--merge") == 0


def test_manifest_formats(corpus_dir, tmp_path):
    expected = C.list_corpus(corpus_dir)
    assert [u.id for u in expected] == IDS
    rels = {u.id: os.path.relpath(u.path, corpus_dir) for u in expected}
    # fairseq: root, then relpath<TAB>num_samples (in any order; the counts are not used)
    tsv = tmp_path / "train.tsv"
    tsv.write_text(f"{corpus_dir}\n" + "".join(f"{rels[i]}\t{sf.info(corpus_dir / rels[i]).frames}\n"
                                              for i in reversed(IDS)))  # fmt: skip
    assert C.list_corpus(tsv) == expected
    # plain list: absolute and manifest-relative paths, comments and blank lines
    plain = tmp_path / "list.txt"
    rel_root = os.path.relpath(corpus_dir, tmp_path)
    lines = [str(corpus_dir / rels[i]) if n % 2 else f"{rel_root}/{rels[i]}" for n, i in enumerate(IDS)]
    plain.write_text("# my corpus\n\n" + "\n".join(lines) + "\n")
    assert C.list_corpus(plain) == expected
    # one plain path: the id is the file's stem
    one = tmp_path / "one.txt"
    one.write_text(str(corpus_dir / rels["b/u4"]) + "\n")
    assert [u.id for u in C.list_corpus(one)] == ["u4"]
    # --ext selects the files of a folder
    assert [u.id for u in C.list_corpus(corpus_dir, "flac")] == ["a/s2/u3", "b/u5"]


def test_duplicate_ids_are_refused(tmp_path, tiny_dir, capsys):
    _write_corpus(tmp_path / "d", {"x": (16000, 0.5, 1, "wav")})
    shutil.copy(tmp_path / "d" / "x.wav", tmp_path / "d" / "x.flac")
    assert _run(tmp_path / "d", "--out", tmp_path / "o", "--models", tiny_dir, *PAIR) == 1
    assert "more than once" in capsys.readouterr().err


def test_broken_and_missing_files_are_logged_and_the_rest_encoded(tiny_dir, corpus_dir, reference, tmp_path):
    (tmp_path / "broken.wav").write_bytes(b"RIFF but not really a wav file")
    manifest = tmp_path / "list.txt"
    good = [u for u in C.list_corpus(corpus_dir) if u.id in ("a/s1/u1", "a/s2/u3")]
    paths = [good[0].path, str(tmp_path / "broken.wav"), str(tmp_path / "gone.wav"), good[1].path]
    manifest.write_text("\n".join(paths) + "\n")
    ids = {u.id: u for u in C.list_corpus(manifest)}  # ids relative to the common folder (tmp_path's parent)
    out = tmp_path / "out"
    assert _run(manifest, "--out", out, "--models", tiny_dir, *PAIR, "--format", "jsonl") == 1
    errors = [json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines()]
    by_path = {e["path"]: e for e in errors}
    assert set(by_path) == {str(tmp_path / "broken.wav"), str(tmp_path / "gone.wav")}
    assert "cannot read audio file" in by_path[str(tmp_path / "broken.wav")]["error"]
    assert "not found" in by_path[str(tmp_path / "gone.wav")]["error"]
    rows = _rows(out)
    assert sorted(rows) == sorted(i for i, u in ids.items() if u.path in (good[0].path, good[1].path))
    for r in rows.values():
        ref = reference[next(u.id for u in good if u.path == r["path"])]
        assert r["units"] == ref.units and r["durations"] == ref.durations
    s = json.loads((out / "summary.json").read_text())
    assert s["count"] == 2 and s["failed"] == 2 and s["missing"] == 0
    assert all(p.suffix == ".jsonl" for p in C.CorpusOutput(out).parts())


def test_without_pyarrow_the_parts_are_json_lines(tiny_dir, corpus_dir, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_output, "have_pyarrow", lambda: False)  # where the output folder asks
    out = tmp_path / "out"
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--ext", "flac") == 0
    assert {p.suffix for p in C.CorpusOutput(out).parts()} == {".jsonl"}
    _check_against_reference(out, reference, ids=["a/s2/u3", "b/u5"])
    _check_text_files(out, reference, ids=["a/s2/u3", "b/u5"])
    assert _run(corpus_dir, "--out", tmp_path / "o2", "--models", tiny_dir, *PAIR, "--format", "parquet") == 1


def test_without_ray_the_error_says_how_to_install_it(tiny_dir, corpus_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError, installed or not
    assert _run(corpus_dir, "--out", tmp_path / "o", "--models", tiny_dir, *PAIR, "--ray") == 1
    assert "pip install -e '.[ray]' in the dpslm-stream checkout" in capsys.readouterr().err


# --- Ray Data --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    pytest.importorskip("pyarrow")
    if ray.is_initialized():  # started by another test module: use it as it is
        yield ray
        return
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # no token file under $HOME for a throw-away local cluster
    try:
        from dpslm_stream.raycluster import init_ray

        init_ray(num_cpus=2)
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


@pytest.mark.ray
def test_ray_output_equals_the_local_output(ray_local, local_out, tiny_dir, corpus_dir, tmp_path):
    out = tmp_path / "out"
    assert _run(corpus_dir, "--out", out, "--models", tiny_dir, *PAIR, "--ray", "--workers", "2",
                "--batch-size", "2") == 0  # fmt: skip
    ray_rows, local_rows = _rows(out), _rows(local_out)
    assert sorted(ray_rows) == sorted(local_rows) == IDS
    for uid in IDS:  # the log-likelihood may differ in the last bits (torch threads per actor)
        a, b = ray_rows[uid], local_rows[uid]
        assert a.pop("loglikelihood") == pytest.approx(b.pop("loglikelihood"), rel=1e-5) and a == b
    for name in ("units.txt", "durations.txt"):
        assert (out / name).read_text() == (local_out / name).read_text()
    a, b = (json.loads((d / "summary.json").read_text()) for d in (out, local_out))
    assert a.pop("loglikelihood_total") == pytest.approx(b.pop("loglikelihood_total"), rel=1e-5)
    assert {k: v for k, v in a.items() if k != "parts"} == {k: v for k, v in b.items() if k != "parts"}


@pytest.mark.ray
def test_ray_resume_after_a_crash_and_errors(ray_local, tiny_dir, corpus_dir, reference, tmp_path, monkeypatch):
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([u.path for u in C.list_corpus(corpus_dir)] + [str(corpus_dir / "gone.wav")]) + "\n")
    out = tmp_path / "out"
    real_add = C.PartWriter.add
    added = []

    def crash_after_two(self, row):
        if len(added) == 2:
            raise RuntimeError("injected crash")
        added.append(row["id"])
        real_add(self, row)

    monkeypatch.setattr(C.PartWriter, "add", crash_after_two)
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(manifest, "--out", out, "--models", tiny_dir, *PAIR, "--ray", "--batch-size", "1", "--part-size", "1")
    assert sorted(_rows(out)) == sorted(added) and len(added) == 2
    monkeypatch.setattr(C.PartWriter, "add", real_add)
    assert _run(manifest, "--out", out, "--models", tiny_dir, *PAIR, "--ray", "--batch-size", "2") == 1  # gone.wav
    _check_against_reference(out, reference)
    _check_text_files(out, reference)
    errors = [json.loads(ln) for ln in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["id"] for e in errors} == {"gone"} and "not found" in errors[0]["error"]
