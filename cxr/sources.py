"""Real data sources for the `download` stage: a local folder, Kaggle, or an archive URL.

Each fetch function fills an empty `dest` with exactly the Kaggle layout
`{train,val,test}/{NORMAL,PNEUMONIA}/<images>` and nothing else, so the manifest the caller
builds from `dest` describes the data and not the packaging (`__MACOSX`, `.DS_Store`, nested
duplicate copies). Sources are only ever read: a local copy or the kagglehub cache stays intact.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator
from tqdm import tqdm

from cxr.atomic import sha256_of
from cxr.classes import CLASSES
from cxr.dataset import IMAGE_SUFFIXES
from cxr.params import Count, Section

SPLITS = ("train", "val", "test")
REQUIRED_SPLITS = ("train", "test")  # the Mendeley release ships no val/
SKIPPED_FOLDERS = frozenset({"__MACOSX"})
MAX_SEARCH_DEPTH = 4  # Kaggle nests chest_xray/chest_xray/; Mendeley nests CellData/chest_xray/
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
# Python >= 3.12 (and security backports) can vet tar members itself; ours is the 3.10 fallback.
TAR_FILTER: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
LAYOUT_HINT = (
    "expected a folder holding train/ and test/ (val/ optional), each with NORMAL/ and "
    "PNEUMONIA/ folders of .jpeg/.jpg/.png images"
)


class DataParams(Section):
    source: Literal["demo", "kaggle", "url", "local"]
    demo_patients: Annotated[int, Field(ge=8)]
    demo_seed: Count
    demo_min_side: Annotated[int, Field(ge=32)]
    demo_max_side: Annotated[int, Field(ge=32)]
    local_path: str
    url: str
    url_sha256: str
    kaggle_dataset: str

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        if self.demo_min_side > self.demo_max_side:
            raise ValueError("data.demo_min_side must not exceed data.demo_max_side")
        if self.source == "url" and not (self.url and self.url_sha256):
            raise ValueError("data.source=url needs data.url and data.url_sha256")
        return self


class SourceError(RuntimeError):
    """A data source that cannot deliver; the message says how to fix it."""


def find_kaggle_root(folder: Path) -> Path:
    """Locate the layout inside whatever wrapping folders a download or archive added.

    The outermost complete copy wins over nested duplicates; `__MACOSX` is never searched.
    """
    if not folder.is_dir():
        raise SourceError(f"{folder} is not a folder; {LAYOUT_HINT}")
    candidates = _candidate_roots(folder)
    if not candidates:
        raise SourceError(
            f"no dataset found under {folder} (searched {MAX_SEARCH_DEPTH} levels deep): "
            f"{LAYOUT_HINT}; found {_describe_entries(folder)}"
        )
    complete = [root for root in candidates if _has_class_folders(root)]
    root = (complete or candidates)[0]
    _check_layout(root)
    return root


def copy_layout(root: Path, dest: Path) -> int:
    """Copy the class folders' files, so nested duplicates never reach the manifest.

    Hidden files (`.DS_Store`, `._*`) are packaging; any other file is copied, so that a stray
    non-image is reported by the manifest rather than skipped unseen. Contents only (no
    permission bits), so a read-only cache does not make `dest` read-only.
    """
    count = 0
    for split in SPLITS:
        for label in CLASSES:
            target = dest / split / label
            target.mkdir(parents=True, exist_ok=True)
            for file in _files_in(root / split / label):
                shutil.copyfile(file, target / file.name)
                count += 1
    return count


def fetch_local(path: Path, dest: Path) -> int:
    """Copy an already-downloaded dataset, e.g. a shared copy on a cluster without internet."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SourceError(
            f"data.local_path {path} does not exist (relative paths start at {Path.cwd()}); "
            f"point it at the unpacked dataset: {LAYOUT_HINT}"
        )
    if path.is_file():
        raise SourceError(
            f"data.local_path {path} is a file; unpack it, or use data.source=url with "
            f"data.url={path.resolve().as_uri()} and its data.url_sha256"
        )
    return copy_layout(find_kaggle_root(path), dest)


def fetch_kaggle(dataset: str, dest: Path) -> int:
    """Download through kagglehub, which caches and needs the user's Kaggle credentials."""
    try:
        import kagglehub  # lazy: only this source needs it, and it is slow to import

        folder = Path(kagglehub.dataset_download(dataset))
    except Exception as err:
        raise SourceError(
            f"Kaggle download of {dataset!r} failed ({type(err).__name__}: {err}). To fix: set "
            "KAGGLE_USERNAME and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/ or "
            "~/.config/kaggle/ (Kaggle > Settings > API > Create New Token); accept the "
            f"dataset's terms at https://www.kaggle.com/datasets/{dataset}; check the network; "
            "or use data.source=url (data.url, data.url_sha256) or data.source=local "
            "(data.local_path)."
        ) from err
    return copy_layout(find_kaggle_root(folder), dest)


def fetch_url(url: str, sha256: str, dest: Path, cache_dir: Path) -> int:
    """Download an archive once (resumably), verify it, and unpack the layout into `dest`.

    The archive is cached as `cache_dir/<sha256[:12]>-<URL file name>`, keyed by its expected
    content so that a changed URL or hash never reuses the wrong file.
    """
    expected = _normalise_sha256(sha256)
    cache_dir.mkdir(parents=True, exist_ok=True)
    archive = cache_dir / f"{expected[:12]}-{_url_file_name(url)}"
    if not (archive.is_file() and sha256_of(archive) == expected):
        _download(url, archive)
        _verify(archive, expected, url)
    return _unpack_layout(archive, dest, cache_dir)


def _candidate_roots(folder: Path) -> list[Path]:
    """Folders holding train/ and test/, breadth first so outer copies come before nested ones."""
    found: list[Path] = []
    level = [folder]
    for _ in range(MAX_SEARCH_DEPTH + 1):
        found += [d for d in level if all((d / split).is_dir() for split in REQUIRED_SPLITS)]
        level = [sub for d in level for sub in _subfolders(d)]
    return found


def _subfolders(folder: Path) -> list[Path]:
    """Via scandir, whose cached file types spare a stat per image in the class folders."""
    with os.scandir(folder) as entries:
        return sorted(
            Path(entry.path)
            for entry in entries
            if entry.is_dir()
            and entry.name not in SKIPPED_FOLDERS
            and not entry.name.startswith(".")
        )


def _has_class_folders(root: Path) -> bool:
    return all((root / s / c).is_dir() for s in REQUIRED_SPLITS for c in CLASSES)


def _check_layout(root: Path) -> None:
    """Fail here, naming the folder, rather than with an empty class deep in training."""
    for split in REQUIRED_SPLITS:
        for label in CLASSES:
            folder = root / split / label
            if not folder.is_dir():
                raise SourceError(f"{folder} is missing; {LAYOUT_HINT}")
            if next(_images_in(folder), None) is None:
                raise SourceError(f"{folder} holds no .jpeg/.jpg/.png images; {LAYOUT_HINT}")


def _describe_entries(folder: Path, limit: int = 20) -> str:
    names = sorted(e.name + "/" if e.is_dir() else e.name for e in folder.iterdir())
    if not names:
        return "an empty folder"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _files_in(folder: Path) -> Iterator[Path]:
    """Regular, non-hidden files: `._*` AppleDouble files share an image suffix but are metadata."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if not entry.name.startswith(".") and entry.is_file():
            yield entry


def _images_in(folder: Path) -> Iterator[Path]:
    return (f for f in _files_in(folder) if f.suffix.lower() in IMAGE_SUFFIXES)


def _normalise_sha256(sha256: str) -> str:
    expected = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise SourceError(
            f"data.url_sha256 must be the archive's 64-hex-digit SHA-256 (as printed by "
            f"`sha256sum archive.zip`), got {sha256!r}"
        )
    return expected


def _url_file_name(url: str) -> str:
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "archive"


def _download(url: str, archive: Path) -> None:
    """Stream into `<archive>.part`, renamed only when complete, so a rerun resumes it."""
    part = archive.with_name(archive.name + ".part")
    try:
        _stream(url, part)
    except NETWORK_ERRORS as err:
        raise SourceError(
            f"cannot download {url}: {err}. Check the URL and the network (a rerun resumes a "
            "partial download), or fetch and unpack the archive yourself and use "
            "data.source=local with data.local_path."
        ) from err
    part.replace(archive)


def _stream(url: str, part: Path) -> None:
    offset = part.stat().st_size if part.exists() else 0
    with _open(url, offset) as response:
        resumed = offset > 0 and response.status == HTTPStatus.PARTIAL_CONTENT
        start = offset if resumed else 0  # a 200 answer (or file://) sends the whole archive
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else None
        with part.open("ab" if resumed else "wb") as out, _progress(part, start, total) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received < total:
        # urllib returns a short body without error when the connection drops.
        raise SourceError(
            f"download of {url} stopped after {received} of {total} bytes; run again to resume"
        )


def _progress(part: Path, start: int, total: int | None) -> tqdm:
    return tqdm(
        total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=part.name
    )


def _open(url: str, offset: int) -> Any:
    """Ask for the bytes after `offset`; if the server cannot serve that range, ask for all."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    request = urllib.request.Request(url, headers=headers)
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if not offset or err.code != HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE:
            raise
        err.close()
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)


def _verify(archive: Path, expected: str, url: str) -> None:
    actual = sha256_of(archive)
    if actual != expected:
        archive.unlink()
        raise SourceError(
            f"sha256 mismatch for {url}: expected {expected}, got {actual}; the download was "
            "removed. Check data.url_sha256 against the publisher's checksum, or data.url."
        )


def _unpack_layout(archive: Path, dest: Path, cache_dir: Path) -> int:
    """Unpack beside the cache (same disk, removed afterwards), then copy the layout out."""
    with tempfile.TemporaryDirectory(prefix="extract-", dir=cache_dir) as tmp:
        folder = Path(tmp)
        _extract(archive, folder)
        try:
            root = find_kaggle_root(folder)
        except SourceError as err:
            raise SourceError(f"archive {archive} does not hold the dataset: {err}") from err
        return copy_layout(root, dest)


def _extract(archive: Path, target: Path) -> None:
    if zipfile.is_zipfile(archive):
        _extract_zip(archive, target)
    elif tarfile.is_tarfile(archive):
        _extract_tar(archive, target)
    else:
        raise SourceError(f"{archive} is neither a zip nor a tar archive; check data.url")


def _extract_zip(archive: Path, target: Path) -> None:
    """Refuse rather than silently rewrite escaping names, which signal a hostile archive."""
    with zipfile.ZipFile(archive) as zipped:
        for name in zipped.namelist():
            _refuse_escape(archive, name, target)
        zipped.extractall(target)


def _extract_tar(archive: Path, target: Path) -> None:
    """Only plain files and folders: links could point the next member outside `target`."""
    with tarfile.open(archive) as tarred:
        members = tarred.getmembers()
        for member in members:
            _refuse_escape(archive, member.name, target)
            if not (member.isfile() or member.isdir()):
                raise SourceError(
                    f"refusing to extract {archive}: member {member.name!r} is a link or a "
                    "special file"
                )
        tarred.extractall(target, members=members, **TAR_FILTER)


def _refuse_escape(archive: Path, name: str, target: Path) -> None:
    root = target.resolve()
    if not (root / name).resolve().is_relative_to(root):
        raise SourceError(
            f"refusing to extract {archive}: member {name!r} would be written outside {target}"
        )
