"""Downloads from a hub-like server on 127.0.0.1: resumed, verified, one line when they fail, the token kept to the hub."""

import os
import socket

import pytest

from mini_gpt2 import DownloadError
from mini_gpt2.download import hub_download
from tests.http_server import Hub

REPO = "openai-community/gpt2"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    server = Hub()
    server.files["model.safetensors"] = os.urandom(3_000_000)
    server.files["config.json"] = b'{"n_layer": 2}'
    server.small.add("config.json")
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("MINI_GPT2_CACHE", str(tmp_path / "cache"))
    yield server
    server.close()


def test_full_download(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = hub_download(REPO, "model.safetensors")
    assert hub.log[0][:2] == ("HEAD", f"/{REPO}/resolve/main/model.safetensors")
    assert hub.log[0][3] == "Bearer hf_secret"
    assert path == tmp_path / "cache" / "openai-community--gpt2" / "model.safetensors"
    assert path.read_bytes() == hub.files["model.safetensors"]
    assert hub_download(REPO, "config.json").read_bytes() == b'{"n_layer": 2}'
    n = len(hub.log)
    assert hub_download(REPO, "model.safetensors") == path and len(hub.log) == n  # cached: no request


def test_resume_after_dropped_connection(hub):
    hub.drop_next = 1
    path = hub_download(REPO, "model.safetensors")
    cdn = [entry for entry in hub.log if entry[0] == "GET" and entry[1].startswith("/cdn/")]
    assert len(cdn) == 2
    assert cdn[0][2] is None
    resumed_from = int(cdn[1][2].removeprefix("bytes=").removesuffix("-"))  # the second asks only for the rest
    assert 0 < resumed_from <= 1_500_000
    assert path.read_bytes() == hub.files["model.safetensors"]


def test_sha256_mismatch_leaves_no_file(hub, tmp_path):
    hub.sha_override = "0" * 64
    with pytest.raises(DownloadError, match="sha256 .* does not match the published 0000"):
        hub_download(REPO, "model.safetensors")
    folder = tmp_path / "cache" / "openai-community--gpt2"
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "model.safetensors.incomplete").exists()


def test_404_is_one_line(hub):
    with pytest.raises(DownloadError) as e:
        hub_download(REPO, "missing.bin")
    msg = str(e.value)
    assert "\n" not in msg and "HTTP 404" in msg and f"{hub.url}/{REPO}/resolve/main/missing.bin" in msg
    assert "by hand" in msg


def test_connection_refused_is_one_line(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MINI_GPT2_CACHE", str(tmp_path))
    with pytest.raises(DownloadError) as e:
        hub_download(REPO, "model.safetensors")
    assert "\n" not in str(e.value) and "ConnectionError" in str(e.value) and "by hand" in str(e.value)


def test_from_pretrained_downloads_a_size_name(tmp_path, monkeypatch):
    """`from_pretrained("gpt2")` goes to the hub; here the 'hub' serves a tiny checkpoint."""
    from tests.conftest import make_checkpoint
    import mini_gpt2

    make_checkpoint(tmp_path / "ckpt", layout="hub")
    server = Hub()
    try:
        for name in ("model.safetensors", "config.json"):
            server.files[name] = (tmp_path / "ckpt" / name).read_bytes()
        server.small.add("config.json")
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("MINI_GPT2_CACHE", str(tmp_path / "cache"))
        model = mini_gpt2.from_pretrained("gpt2", device="cpu")
        assert model.config.n_layer == 2
        assert ("HEAD", "/openai-community/gpt2/resolve/main/model.safetensors", None, None) in server.log
    finally:
        server.close()


def test_the_token_goes_to_the_hub_only_never_to_another_host(hub, monkeypatch):
    """The hub's redirect to a CDN on another host must not carry HF_TOKEN there."""
    cdn = Hub()
    try:
        cdn.files["model.safetensors"] = hub.files["model.safetensors"]
        hub.cdn = cdn.url  # the hub's redirects now point at the other server
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        path = hub_download(REPO, "model.safetensors")
        assert path.read_bytes() == hub.files["model.safetensors"]
        assert hub.log and all(entry[3] == "Bearer hf_secret" for entry in hub.log)
        assert cdn.log and all(entry[3] is None for entry in cdn.log), cdn.log
    finally:
        cdn.close()


@pytest.mark.parametrize("value", ["abc", "-5", "1e6", " "])
def test_a_size_header_that_is_not_a_number_is_one_line(hub, value):
    hub.headers["X-Linked-Size"] = value
    with pytest.raises(DownloadError) as e:
        hub_download(REPO, "model.safetensors")
    assert "\n" not in str(e.value) and "is not a number of bytes" in str(e.value)


def test_an_empty_answer_is_one_line(hub, tmp_path):
    hub.files["config.json"] = b""  # answered directly, with Content-Length: 0
    with pytest.raises(DownloadError, match="the server answered with an empty file") as e:
        hub_download(REPO, "config.json")
    assert "\n" not in str(e.value) and "does not exist" not in str(e.value)
    assert not list((tmp_path / "cache" / "openai-community--gpt2").glob("config.json*"))


def test_a_server_that_ignores_range_gives_a_whole_file_anyway(hub):
    """Cut off half-way, then answered with the whole file again (200, not 206): it starts over instead of appending."""
    hub.drop_next, hub.ignore_range = 1, True
    path = hub_download(REPO, "model.safetensors")
    assert [e[2] is not None for e in hub.log if e[0] == "GET" and e[1].startswith("/cdn/")] == [False, True]
    assert path.read_bytes() == hub.files["model.safetensors"]
