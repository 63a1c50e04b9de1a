"""Tests for cxr.sources: local copies, archive URLs (file:// and a local HTTP server), Kaggle.

Everything runs offline on tiny fake layouts; image bytes are random because nothing decodes them.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cxr.sources import SourceError, fetch_kaggle, fetch_local, fetch_url, find_kaggle_root

SPLITS = ("train", "val", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_NAMES = ("a.jpeg", "B.JPEG", "c.jpg", "d.png")


def write_bytes(path: Path, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(24) if data is None else data)


def make_layout(root: Path, splits: tuple[str, ...] = SPLITS) -> set[str]:
    """A Kaggle-layout tree with macOS junk and a stray file; returns the paths to expect."""
    images = set()
    for split in splits:
        for label in CLASSES:
            folder = root / split / label
            for name in IMAGE_NAMES:
                write_bytes(folder / name)
                images.add(f"{split}/{label}/{name}")
            write_bytes(folder / ".DS_Store")
            write_bytes(folder / "._a.jpeg")
            write_bytes(folder / "notes.txt")  # copied, so the manifest can report it
            images.add(f"{split}/{label}/notes.txt")
    write_bytes(root / ".DS_Store")
    return images


def add_macosx(parent: Path) -> None:
    """What the Kaggle zip carries: AppleDouble copies of the whole layout under __MACOSX."""
    for split in ("train", "test"):
        for label in CLASSES:
            write_bytes(parent / "__MACOSX" / split / label / "._a.jpeg")


def files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        )
        for p in folder.rglob("*")
    }


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


# --- local folders -------------------------------------------------------------------------


def test_fetch_local_copies_only_images_and_leaves_source_unchanged(
    tmp_path: Path, dest: Path
) -> None:
    source = tmp_path / "chest_xray"
    images = make_layout(source)
    add_macosx(source)
    before = snapshot(source)

    count = fetch_local(source, dest)

    assert count == len(images)
    assert files_under(dest) == images
    assert snapshot(source) == before
    copied = dest / "train" / "NORMAL" / "a.jpeg"
    assert copied.read_bytes() == (source / "train" / "NORMAL" / "a.jpeg").read_bytes()


def test_fetch_local_finds_nested_root_past_macosx(tmp_path: Path, dest: Path) -> None:
    archive = tmp_path / "archive"
    add_macosx(archive)  # shallower than the real root, so it must be skipped, not chosen
    images = make_layout(archive / "chest_xray" / "chest_xray")

    assert find_kaggle_root(archive) == archive / "chest_xray" / "chest_xray"
    assert fetch_local(archive, dest) == len(images)
    assert files_under(dest) == images


def test_outer_copy_wins_over_nested_duplicate(tmp_path: Path) -> None:
    outer = tmp_path / "chest_xray"
    make_layout(outer)
    make_layout(outer / "chest_xray")

    assert find_kaggle_root(tmp_path) == outer


def test_missing_val_gives_empty_val_folders(tmp_path: Path, dest: Path) -> None:
    images = make_layout(tmp_path / "src", splits=("train", "test"))

    assert fetch_local(tmp_path / "src", dest) == len(images)
    assert sorted(p.name for p in (dest / "val").iterdir()) == list(CLASSES)
    assert not any((dest / "val").rglob("*.*"))


def test_missing_class_folder_is_named(tmp_path: Path, dest: Path) -> None:
    make_layout(tmp_path / "src")
    shutil.rmtree(tmp_path / "src" / "train" / "NORMAL")

    with pytest.raises(SourceError, match=re.escape(str(tmp_path / "src" / "train" / "NORMAL"))):
        fetch_local(tmp_path / "src", dest)
    assert not any(dest.iterdir())


def test_class_folder_without_images_is_named(tmp_path: Path, dest: Path) -> None:
    make_layout(tmp_path / "src")
    folder = tmp_path / "src" / "test" / "PNEUMONIA"
    for image in IMAGE_NAMES:
        (folder / image).unlink()

    with pytest.raises(SourceError, match=f"{re.escape(str(folder))} holds no"):
        fetch_local(tmp_path / "src", dest)


def test_missing_path_is_named(tmp_path: Path, dest: Path) -> None:
    missing = tmp_path / "no-such-folder"

    with pytest.raises(SourceError, match=re.escape(str(missing))):
        fetch_local(missing, dest)


def test_archive_as_local_path_suggests_url_source(tmp_path: Path, dest: Path) -> None:
    write_bytes(tmp_path / "data.zip")

    with pytest.raises(SourceError, match=re.escape("data.source=url")):
        fetch_local(tmp_path / "data.zip", dest)


def test_folder_without_layout_says_what_was_found(tmp_path: Path, dest: Path) -> None:
    write_bytes(tmp_path / "src" / "images" / "x.jpeg")
    write_bytes(tmp_path / "src" / "readme.md")

    with pytest.raises(SourceError) as caught:
        fetch_local(tmp_path / "src", dest)
    message = str(caught.value)
    assert "images/" in message
    assert "readme.md" in message
    assert "train/" in message
    assert "NORMAL/" in message


# --- archive URLs --------------------------------------------------------------------------


def make_archive(tmp_path: Path, fmt: str = "zip") -> tuple[Path, set[str]]:
    """An archive shaped like the Kaggle download: chest_xray/{layout, __MACOSX}."""
    tree = tmp_path / "archive-tree"
    images = make_layout(tree / "chest_xray")
    add_macosx(tree / "chest_xray")
    path = Path(shutil.make_archive(str(tmp_path / "data"), fmt, root_dir=tree))
    shutil.rmtree(tree)
    return path, images


@pytest.mark.parametrize("fmt", ["zip", "gztar", "tar"])
def test_fetch_url_extracts_file_url(tmp_path: Path, dest: Path, cache: Path, fmt: str) -> None:
    archive, images = make_archive(tmp_path, fmt)

    count = fetch_url(archive.as_uri(), sha256_of(archive), dest, cache)

    assert count == len(images)
    assert files_under(dest) == images
    assert not list(cache.glob("extract-*"))
    assert not list(cache.glob("*.part"))


def test_wrong_sha256_names_both_hashes_and_removes_download(
    tmp_path: Path, dest: Path, cache: Path
) -> None:
    archive, _ = make_archive(tmp_path)
    wrong = "0" * 64

    with pytest.raises(SourceError) as caught:
        fetch_url(archive.as_uri(), wrong, dest, cache)

    assert wrong in str(caught.value)
    assert sha256_of(archive) in str(caught.value)
    assert not any(cache.iterdir())
    assert not any(dest.iterdir())


def test_malformed_sha256_is_rejected(tmp_path: Path, dest: Path, cache: Path) -> None:
    archive, _ = make_archive(tmp_path)

    with pytest.raises(SourceError, match="64-hex-digit"):
        fetch_url(archive.as_uri(), "abc123", dest, cache)


def add_tar_member(tarred: tarfile.TarFile, info: tarfile.TarInfo, data: bytes = b"") -> None:
    info.size = len(data)
    tarred.addfile(info, io.BytesIO(data))


def layout_members(tarred: tarfile.TarFile) -> None:
    for split in ("train", "test"):
        for label in CLASSES:
            add_tar_member(tarred, tarfile.TarInfo(f"chest_xray/{split}/{label}/a.jpeg"), b"xy")


def assert_refused(tmp_path: Path, archive: Path, member: str, dest: Path, cache: Path) -> None:
    with pytest.raises(SourceError, match=re.escape(repr(member))):
        fetch_url(archive.as_uri(), sha256_of(archive), dest, cache)
    assert not any(dest.iterdir())
    assert not list(cache.glob("extract-*"))
    assert not [p for p in tmp_path.rglob("*") if p.is_symlink()]
    assert not list(tmp_path.rglob("evil.jpeg"))


def test_zip_member_escaping_upwards_is_refused(tmp_path: Path, dest: Path, cache: Path) -> None:
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for split in ("train", "test"):
            for label in CLASSES:
                zipped.writestr(f"chest_xray/{split}/{label}/a.jpeg", b"xy")
        zipped.writestr("../evil.jpeg", b"boom")

    assert_refused(tmp_path, archive, "../evil.jpeg", dest, cache)


def test_tar_absolute_member_is_refused(tmp_path: Path, dest: Path, cache: Path) -> None:
    target = tmp_path / "outside" / "evil.jpeg"
    archive = tmp_path / "hostile.tar.gz"
    with tarfile.open(archive, "w:gz") as tarred:
        layout_members(tarred)
        add_tar_member(tarred, tarfile.TarInfo(str(target)), b"boom")

    assert_refused(tmp_path, archive, str(target), dest, cache)


def test_tar_symlink_is_refused(tmp_path: Path, dest: Path, cache: Path) -> None:
    member = "chest_xray/train/NORMAL/link.jpeg"
    link = tarfile.TarInfo(member)
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tmp_path / "hostile.tar"
    with tarfile.open(archive, "w") as tarred:
        layout_members(tarred)
        add_tar_member(tarred, link)

    assert_refused(tmp_path, archive, member, dest, cache)


# --- HTTP: resume and reuse ----------------------------------------------------------------


@contextmanager
def serve(
    payload: bytes, *, honour_range: bool = True, send_at_most: int | None = None
) -> Iterator[tuple[str, list[str | None]]]:
    """Serve `payload` at http://127.0.0.1:<port>/data.zip; yields the URL and the Range log."""
    ranges: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ranges.append(self.headers.get("Range"))
            asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            start = int(asked[1]) if honour_range and asked else 0
            if start:
                self.send_response(206)
                end, size = len(payload) - 1, len(payload)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            body = payload[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:send_at_most])

        def log_message(self, *args: object) -> None:
            """Keep test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/data.zip", ranges
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def cached_name(digest: str) -> str:
    """The documented cache name: <sha256[:12]>-<URL file name>."""
    return f"{digest[:12]}-data.zip"


def test_partial_download_resumes_with_range(tmp_path: Path, dest: Path, cache: Path) -> None:
    archive, images = make_archive(tmp_path)
    payload, digest = archive.read_bytes(), sha256_of(archive)
    half = len(payload) // 2
    write_bytes(cache / f"{cached_name(digest)}.part", payload[:half])

    with serve(payload) as (url, ranges):
        assert fetch_url(url, digest, dest, cache) == len(images)

    assert ranges == [f"bytes={half}-"]
    assert sha256_of(cache / cached_name(digest)) == digest
    assert not list(cache.glob("*.part"))
    assert files_under(dest) == images


def test_server_ignoring_range_restarts_download(tmp_path: Path, dest: Path, cache: Path) -> None:
    archive, images = make_archive(tmp_path)
    payload, digest = archive.read_bytes(), sha256_of(archive)
    half = len(payload) // 2
    write_bytes(cache / f"{cached_name(digest)}.part", b"x" * half)  # would corrupt if appended

    with serve(payload, honour_range=False) as (url, ranges):
        assert fetch_url(url, digest, dest, cache) == len(images)

    assert ranges == [f"bytes={half}-"]
    assert sha256_of(cache / cached_name(digest)) == digest


def test_interrupted_download_resumes_on_rerun(tmp_path: Path, dest: Path, cache: Path) -> None:
    archive, images = make_archive(tmp_path)
    payload, digest = archive.read_bytes(), sha256_of(archive)
    half = len(payload) // 2

    with serve(payload, send_at_most=half) as (url, _), pytest.raises(SourceError, match=url):
        fetch_url(url, digest, dest, cache)
    assert (cache / f"{cached_name(digest)}.part").stat().st_size == half

    with serve(payload) as (url, ranges):
        assert fetch_url(url, digest, dest, cache) == len(images)
    assert ranges == [f"bytes={half}-"]


def test_verified_archive_is_reused_without_contacting_server(tmp_path: Path, cache: Path) -> None:
    archive, images = make_archive(tmp_path)
    payload, digest = archive.read_bytes(), sha256_of(archive)

    with serve(payload) as (url, ranges):
        for run in ("first", "second"):
            run_dest = tmp_path / run
            run_dest.mkdir()
            assert fetch_url(url, digest, run_dest, cache) == len(images)

    assert ranges == [None]


def test_unreachable_server_names_url_and_local_fallback(
    tmp_path: Path, dest: Path, cache: Path
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago refuses connections
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"

    with pytest.raises(SourceError) as caught:
        fetch_url(url, "0" * 64, dest, cache)

    assert url in str(caught.value)
    assert "data.source=local" in str(caught.value)


# --- Kaggle --------------------------------------------------------------------------------


def test_kaggle_failure_explains_credentials(monkeypatch: pytest.MonkeyPatch, dest: Path) -> None:
    kagglehub = pytest.importorskip("kagglehub")

    def refuse(*args: object, **kwargs: object) -> str:
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(kagglehub, "dataset_download", refuse)

    with pytest.raises(SourceError) as caught:
        fetch_kaggle("paultimothymooney/chest-xray-pneumonia", dest)
    message = str(caught.value)
    assert "KAGGLE_USERNAME" in message
    assert "kaggle.json" in message
    assert "401 Unauthorized" in message
    assert "data.source=local" in message


def test_kaggle_download_folder_is_copied(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dest: Path
) -> None:
    kagglehub = pytest.importorskip("kagglehub")
    download = tmp_path / "kagglehub" / "versions" / "2"
    images = make_layout(download / "chest_xray")
    add_macosx(download / "chest_xray")
    make_layout(download / "chest_xray" / "chest_xray")  # the archive's nested duplicate
    requested = []

    def fake_download(handle: str, *args: object, **kwargs: object) -> str:
        requested.append(handle)
        return str(download)

    monkeypatch.setattr(kagglehub, "dataset_download", fake_download)

    assert fetch_kaggle("paultimothymooney/chest-xray-pneumonia", dest) == len(images)
    assert requested == ["paultimothymooney/chest-xray-pneumonia"]
    assert files_under(dest) == images
