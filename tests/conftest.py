"""Suite-wide fixtures: kernels built once per session."""
from __future__ import annotations

from pathlib import Path

import pytest

from pvtool import driver


@pytest.fixture(scope="session")
def kernel_image(tmp_path_factory):
    """(kernel path, target) -> path of its image, built once per session."""
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
