"""Many photos uploaded at once (the web UI's "Many photos" tab): files and zip archives -> the
images to caption, each under the name the user knows it by.

A zip is untrusted input, so it is never extracted with extractall() and nothing in it chooses a
path on this machine: each image member is copied, by streaming, to a new file named by its
position (00003.jpg) in a fresh folder, so "../../etc/x.jpg", absolute names and links go nowhere.
Limits are checked from the central directory before anything is copied: at most MAX_ZIP_MEMBERS
entries and MAX_ZIP_BYTES uncompressed for its images (zipfile never returns more bytes than a
member declares, and the copy stops at the budget anyway). Pixels are the engine's business: every
image passes the same admission as the rest of the project (preprocess.MAX_PIXELS, judged from the
header), so a decompression bomb inside a zip is an error row like any other. Folders inside the
zip are fine; members that are not named like images (notes.txt, a nested zip) and macOS
metadata (__MACOSX/, ._photo.jpg) are ignored and counted.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .batch import image_suffixes

MAX_ZIP_MEMBERS = 2000              # entries in one archive: folders and other files count too
MAX_ZIP_BYTES = 512 * 2**20         # uncompressed bytes of the images taken from one archive
COPY_CHUNK = 2**20


class UploadError(Exception):
    """The upload as a whole cannot be used (e.g. too many photos); the message is for the user."""


@dataclass
class Upload:
    name: str                 # as the user knows it: "beach.jpg", "holiday.zip/day 1/beach.jpg"
    path: str | None          # the file to caption; None when `error` says why there is none
    error: str | None = None


@dataclass
class Uploads:
    items: list[Upload]
    ignored: int = 0          # zip members that are not images (not captioned, no row)


def is_zip(path: str) -> bool:
    """A .zip, or a file not named like an image whose content is a zip."""
    suffix = Path(path).suffix.lower()
    if suffix == ".zip":
        return True
    return suffix not in image_suffixes() and zipfile.is_zipfile(path)


def collect_uploads(paths: list[str], workdir: str | os.PathLike, max_photos: int) -> Uploads:
    """The uploaded files in order, zips replaced by their images (copied into workdir).
    UploadError when there are more than max_photos images in all."""
    uploads = Uploads([])
    for path in paths:
        name = Path(path).name
        if is_zip(path):
            folder = Path(tempfile.mkdtemp(prefix="zip", dir=workdir))
            from_zip = zip_images(path, name, folder)
            uploads.items += from_zip.items
            uploads.ignored += from_zip.ignored
        else:
            uploads.items.append(Upload(name, path))
        photos = sum(u.path is not None for u in uploads.items)
        if photos > max_photos:
            raise UploadError(f"Too many photos: at most {max_photos} at once (in files and zips together).")
    return uploads


def ignored_member(info: zipfile.ZipInfo, suffixes: frozenset[str]) -> bool:
    parts = PurePosixPath(info.filename).parts
    return ("__MACOSX" in parts or not parts or parts[-1].startswith("._")
            or PurePosixPath(info.filename).suffix.lower() not in suffixes)


def zip_images(path: str, name: str, folder: Path) -> Uploads:
    """The image members of one zip, copied into folder; a problem with the whole archive is
    one error row named after it, a problem with one member an error row for that member."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_ZIP_MEMBERS:
                return Uploads([Upload(name, None, f"this zip has {len(members):,} entries; the limit is "
                                                   f"{MAX_ZIP_MEMBERS:,}")])
            suffixes = image_suffixes()
            images = [m for m in members if not m.is_dir() and not ignored_member(m, suffixes)]
            ignored = sum(not m.is_dir() for m in members) - len(images)
            declared = sum(m.file_size for m in images)
            if declared > MAX_ZIP_BYTES:
                return Uploads([Upload(name, None, f"its images are {declared / 2**20:,.0f} MB uncompressed; "
                                                   f"the limit is {MAX_ZIP_BYTES / 2**20:,.0f} MB")], ignored)
            if not images:
                return Uploads([Upload(name, None, "no images in this zip")], ignored)
            budget = MAX_ZIP_BYTES
            items = []
            for index, member in enumerate(images):
                shown = f"{name}/{member.filename}"
                target = folder / f"{index:05d}{PurePosixPath(member.filename).suffix.lower()}"
                try:
                    budget -= copy_member(archive, member, target, budget)
                    items.append(Upload(shown, str(target)))
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
                        OSError, ValueError) as exc:
                    items.append(Upload(shown, None, member_problem(exc)))
            return Uploads(items, ignored)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        return Uploads([Upload(name, None, f"not a zip file that can be read ({exc})")])


def copy_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Copy one member's bytes to target (a new regular file: never a link, whatever the zip
    says); returns the bytes copied. ValueError past the budget."""
    if stat.S_ISLNK(member.external_attr >> 16):
        raise ValueError("a symbolic link, not a photo")
    if member.flag_bits & 0x1:
        raise RuntimeError("encrypted")
    copied = 0
    with archive.open(member) as source, open(target, "xb") as sink:
        while chunk := source.read(COPY_CHUNK):
            copied += len(chunk)
            if copied > budget:
                raise ValueError(f"over the zip's limit of {MAX_ZIP_BYTES / 2**20:,.0f} MB uncompressed")
            sink.write(chunk)
    return copied


def member_problem(exc: Exception) -> str:
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc).lower():
        return "encrypted: cannot be read without the password"
    if isinstance(exc, NotImplementedError):
        return f"compressed with a method zipfile cannot read ({exc})"
    return str(exc) or type(exc).__name__


def remove_tree(folder: str | os.PathLike) -> None:
    shutil.rmtree(folder, ignore_errors=True)
