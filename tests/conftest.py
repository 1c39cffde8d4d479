"""Suite-wide fixtures: every image the tests build is recorded, and kernels are built once.

`pytest_configure` wraps `pvtool.driver.compile_file` before any test module
is imported, so images built by any test (including modules that did
`from pvtool.driver import compile_file`) land in one list;
test_zz_no_sensitive.py, which runs last, sweeps every PV image in it.
Images built in a subprocess (`python -m pvtool build`) are not seen.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pvtool import driver


@dataclass(frozen=True)
class BuiltImage:
    source: str
    target: str
    image: bytes


class Recorder:
    """The images built this session, one entry per distinct (target, bytes)."""

    def __init__(self) -> None:
        self.images: list[BuiltImage] = []
        self._seen: set[tuple[str, bytes]] = set()

    def add(self, source: str, target: str, image: bytes) -> None:
        key = (target, hashlib.sha256(image).digest())
        if key not in self._seen:
            self._seen.add(key)
            self.images.append(BuiltImage(source, target, image))

    def of_target(self, target: str) -> list[BuiltImage]:
        return [b for b in self.images if b.target == target]


RECORDER = Recorder()


def pytest_configure(config: pytest.Config) -> None:
    original = driver.compile_file

    @functools.wraps(original)
    def compile_and_record(path, target: str = "pv") -> bytes:
        image = original(path, target)
        RECORDER.add(str(path), target, image)
        return image

    driver.compile_file = compile_and_record
    config.add_cleanup(lambda: setattr(driver, "compile_file", original))


@pytest.fixture(scope="session")
def built_images() -> Recorder:
    """Every image `pvtool.driver.compile_file` returned so far in this session."""
    return RECORDER


@pytest.fixture(scope="session")
def kernel_image(tmp_path_factory):
    """(kernel path, target) -> path of its image, built once per session (and recorded)."""
    cache: dict[tuple[Path, str], Path] = {}
    folder = tmp_path_factory.mktemp("images")

    def build(path: Path, target: str) -> Path:
        key = (path, target)
        if key not in cache:
            out = folder / f"{len(cache)}-{path.stem}.{target}.elf"
            out.write_bytes(driver.compile_file(str(path), target))
            cache[key] = out
        return cache[key]
    return build
