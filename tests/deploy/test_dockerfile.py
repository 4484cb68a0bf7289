"""The Dockerfile, linted: no image builder (docker, buildah, kaniko) runs on
the development machines or CI, so the image is checked by rules instead of
built. hadolint (shipped as a wheel) checks the general practice; the tests
below check the rules this project sets for its images."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
SOURCES = ("services", "protos", "models")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    stage: int  # index of the FROM it belongs to


def parse(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, arguments.strip(), stage))
        logical = ""
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(DOCKERFILE.read_text())


def image_roles() -> list[str]:
    match = re.search(r"^IMAGE_ROLES := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile names no IMAGE_ROLES"
    return match[1].split()


def pins(lock: Path) -> dict[str, str]:
    found = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            found[match[1].lower()] = match[2]
    return found


def test_hadolint_finds_nothing() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_build_is_multi_stage_on_a_pinned_slim_base(instructions: list[Instruction]) -> None:
    stages = [i for i in instructions if i.keyword == "FROM"]
    assert len(stages) >= 2, "build tools stay out of the final image"
    args = {
        name: default
        for i in instructions
        if i.keyword == "ARG" and i.stage == -1
        for name, _, default in [i.arguments.partition("=")]
    }
    for stage in stages:
        image = stage.arguments.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        _, _, tag = image.partition(":")
        assert tag and tag != "latest", f"{image}: pin a tag, never latest"
        assert "slim" in tag, f"{image}: a slim base"


def test_the_lock_is_installed_before_the_sources_are_copied(
    instructions: list[Instruction],
) -> None:
    build = [i for i in instructions if i.stage == 0]
    copies = [n for n, i in enumerate(build) if i.keyword == "COPY"]
    lock_copy = next(n for n in copies if "requirements/${ROLE}.lock" in build[n].arguments)
    install = next(
        n for n, i in enumerate(build) if i.keyword == "RUN" and "-r" in i.arguments.split()
    )
    first_source = min(n for n in copies if any(build[n].arguments.startswith(s) for s in SOURCES))
    assert lock_copy < install < first_source


def test_the_final_stage_runs_as_a_numeric_non_root_user(
    instructions: list[Instruction],
) -> None:
    last = max(i.stage for i in instructions)
    users = [i.arguments for i in instructions if i.stage == last and i.keyword == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"USER {users[-1]}: numeric and not root"
    entry = next(i for i in instructions if i.stage == last and i.keyword == "ENTRYPOINT")
    assert 'python -m \\"converge.${CONVERGE_ROLE}\\"' in entry.arguments
    assert not any(i.keyword == "ADD" for i in instructions), "COPY, not ADD"


def test_every_role_has_a_lock_held_to_the_root_lock_with_only_what_it_runs() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    root = pins(ROOT / "requirements.lock")
    for role in image_roles():
        assert role in extras, f"role {role} has no extra"
        role_pins = pins(ROOT / "requirements" / f"{role}.lock")
        if role != "tracking":  # the MLflow server's image: resolved on its own (Makefile)
            drifted = {p: v for p, v in role_pins.items() if root.get(p) != v}
            assert not drifted, f"requirements/{role}.lock differs from the root lock: {drifted}"
        assert ("lightgbm" in role_pins) == (role in {"scoring", "models"}), role
        assert ("mlflow" in role_pins) == (role in {"scoring", "models", "tracking"}), role
        assert ("psycopg2-binary" in role_pins) == (role == "tracking"), role
        assert "pytest" not in role_pins and "pgserver" not in role_pins, role


def test_the_build_context_leaves_out_local_state() -> None:
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[ignored.index("*") :], "everything is ignored unless allowed"
    allowed = {line[1:].rstrip("/") for line in ignored if line.startswith("!")}
    assert allowed >= {"requirements", *SOURCES}
    assert not allowed & {".venv", "var", "tests", ".git"}


def test_roles_that_load_lightgbm_install_the_openmp_runtime_it_links(
    instructions: list[Instruction],
) -> None:
    """LightGBM's wheel does not bundle libgomp.so.1 and the slim base lacks it:
    without it `import lightgbm` fails and the scoring pod never starts."""
    import lightgbm

    library = Path(lightgbm.__file__).parent / "lib" / "lib_lightgbm.so"
    assert b"libgomp.so.1" in library.read_bytes(), "LightGBM no longer links libgomp"
    last = max(i.stage for i in instructions)
    (install,) = [
        i.arguments for i in instructions if i.stage == last and "libgomp1" in i.arguments
    ]
    assert "--no-install-recommends" in install and "rm -rf /var/lib/apt/lists" in install
    for role in image_roles():
        loads_lightgbm = "lightgbm" in pins(ROOT / "requirements" / f"{role}.lock")
        assert (f'"${{ROLE}}" = {role} ' in install) == loads_lightgbm, role
