"""The data path: the CSV reader, the streamed Kaggle download (from a server on 127.0.0.1), the split and its near-duplicates."""

import csv
import io
import random
import zipfile

import pytest

from machinery import data
from tests.http_server import Hub

KAGGLE_PATH = f"/api/v1/datasets/download/{data.KAGGLE_DATASET}"


def write(path, text, bom=False):
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_reads_awkward_csv(tmp_path):
    text = ('en,fr\r\n'
            '"Hello, world","Bonjour, le monde"\r\n'
            '"She said ""hi""","Elle a dit « salut »"\r\n'
            '"Two\nlines","Deux\nlignes"\r\n'
            '\r\n'                       # blank line: ignored
            'only one column\r\n'        # broken: skipped
            ',vide\r\n'                  # empty English: skipped
            'Last,Dernier\r\n')
    for bom in (False, True):
        pairs, lines, skipped = data.read_pairs(write(tmp_path / "a.csv", text, bom))
        assert pairs == [("Hello, world", "Bonjour, le monde"), ('She said "hi"', "Elle a dit « salut »"),
                         ("Two\nlines", "Deux\nlignes"), ("Last", "Dernier")]
        assert lines == [2, 3, 4, 10]  # where each pair starts in the file (the third spans lines 4 to 6)
        assert skipped == 2


def test_reads_only_the_first_rows_and_finds_columns_by_name(tmp_path):
    path = write(tmp_path / "b.csv", "fr,en\n" + "".join(f"f{i},e{i}\n" for i in range(1000)))
    pairs, lines, _ = data.read_pairs(path, limit=3)
    assert pairs == [("e0", "f0"), ("e1", "f1"), ("e2", "f2")] and lines == [2, 3, 4]
    with pytest.raises(data.UserError, match="header naming the columns en and fr"):
        data.read_pairs(write(tmp_path / "c.csv", "english,french\na,b\n"))


def test_normalise_folds_case_and_punctuation_but_keeps_accents():
    assert data.normalise("L'été,  déjà !") == data.normalise("l’Été déjà") == "l été déjà"
    assert data.normalise("ete deja") != data.normalise("été déjà")


def test_split_is_seeded_and_never_leaks():
    pairs = [(f"English {i % 150}", f"Français {i}") for i in range(300)]  # each English sentence twice
    pairs += [(f"english {i}!", f"autre {i}") for i in range(100)]  # near-copies of the first 100
    s = data.split(pairs, heldout=20, val_size=30, seed=1)
    assert data.split(pairs, heldout=20, val_size=30, seed=1) == s
    assert data.split(pairs, heldout=20, val_size=30, seed=2).held != s.held
    assert (len(s.held), len(s.val)) == (20, 30)
    assert sorted(s.held + s.val + s.train + s.dropped) == list(range(len(pairs)))  # each pair has one role
    en = lambda idx: {data.normalise(pairs[i][0]) for i in idx}  # noqa: E731
    fr = lambda idx: {data.normalise(pairs[i][1]) for i in idx}  # noqa: E731
    assert not en(s.train) & en(s.held + s.val) and not fr(s.train) & fr(s.held + s.val)
    assert not en(s.val) & en(s.held) and not fr(s.val) & fr(s.held)
    assert any(pairs[i][0].startswith("english") for i in s.dropped)  # near-copies were caught
    assert len(data.split(pairs[:50], heldout=1000, val_size=1000).held) == 5  # at most a tenth


def kaggle_zip(rows):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["en", "fr"])
    w.writerows(rows)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("en-fr.csv", "\ufeff" + buf.getvalue())
    return out.getvalue()


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    server = Hub()
    monkeypatch.setenv("KAGGLE_API_ENDPOINT", server.url)
    monkeypatch.setenv("MINI_GPT2_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    yield server
    server.close()


def test_kaggle_download_streams_and_stops_early(kaggle, monkeypatch):
    rng = random.Random(0)
    noise = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ,\"") for _ in range(80))  # noqa: E731
    rows = [(f"English {i} {noise()}", f"Français {i}\n{noise()}") for i in range(20_000)]
    body = kaggle_zip(rows)
    kaggle.pages[KAGGLE_PATH] = body
    # The server sends the first half (thousands of rows, far more than 500), then waits: a reader
    # that stops early hangs up there; one that reads on would get the second half.
    kaggle.hold[KAGGLE_PATH] = len(body) // 2
    monkeypatch.setenv("KAGGLE_USERNAME", "ada")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    path = data.fetch_kaggle(rows=500)
    pairs, _, skipped = data.read_pairs(path, limit=10**9)
    assert pairs == [(en.strip(), fr.strip()) for en, fr in rows[:500]] and skipped == 0
    assert kaggle.log[0][3] == "Basic YWRhOnNlY3JldA=="  # ada:secret
    assert kaggle.hung_up.wait(60) and not kaggle.sent_all.is_set()  # it closed the connection mid-body
    n = len(kaggle.log)
    assert data.fetch_kaggle(rows=500) == path and len(kaggle.log) == n  # cached


def test_kaggle_failures_are_one_line(kaggle):
    with pytest.raises(data.DownloadError) as e:
        data.fetch_kaggle(rows=10)  # nothing served: 404
    assert "HTTP 404" in str(e.value) and "--data" in str(e.value) and "\n" not in str(e.value)
    kaggle.pages[KAGGLE_PATH] = b"<html>not a zip</html>"
    with pytest.raises(data.DownloadError, match="readable zip"):
        data.fetch_kaggle(rows=10)
    assert not list((kaggle_cache := data.cache_dir() / "en-fr").glob("*.csv")), list(kaggle_cache.iterdir())


def test_kaggle_credentials_go_to_kaggle_only_never_to_another_host(kaggle, monkeypatch):
    """Kaggle answers the download with a redirect to its storage, another host: the credentials stay behind."""
    storage = Hub()
    try:
        storage.pages["/bucket/en-fr.zip"] = kaggle_zip([("Hello.", "Bonjour.")] * 20)
        kaggle.redirects[KAGGLE_PATH] = f"{storage.url}/bucket/en-fr.zip"
        monkeypatch.setenv("KAGGLE_USERNAME", "ada")
        monkeypatch.setenv("KAGGLE_KEY", "secret")
        pairs, _, _ = data.read_pairs(data.fetch_kaggle(rows=5))
        assert pairs == [("Hello.", "Bonjour.")] * 5
        assert kaggle.log and all(entry[3] == "Basic YWRhOnNlY3JldA==" for entry in kaggle.log)
        assert storage.log and all(entry[3] is None for entry in storage.log), storage.log
    finally:
        storage.close()


def test_a_near_duplicate_on_the_french_side_alone_is_never_trained_on():
    """Different English, the same French once normalised (and the other way round): both are kept out of training."""
    pairs = [(f"English {i}", f"Français {i % 150}") for i in range(300)]  # each French sentence twice
    pairs += [(f"Anglais {i % 150}.", f"autre {i}") for i in range(300)]  # each English sentence twice
    s = data.split(pairs, heldout=30, val_size=30, seed=4)
    for side in (0, 1):
        kept_out = {data.normalise(pairs[i][side]) for i in s.held + s.val}
        assert not {data.normalise(pairs[i][side]) for i in s.train} & kept_out
        assert not {data.normalise(pairs[i][side]) for i in s.val} & {data.normalise(pairs[i][side]) for i in s.held}
    assert len(s.dropped) >= 30  # the twins of the pairs kept out
