"""Test set-up: one CPU thread, the fixture data under tests/fixtures, and the optional real files.

tests/fixtures/<benchmark>/ holds small files in each benchmark's published format, written for
this project (invented questions; no line comes from the real files, several of which are
licensed non-commercial). Every loader, scorer and CLI test runs on them, so a fresh clone
passes its tests on its own.

The real question files (counts, LLaVA's question ids, prompt snapshots) are checked by the
tests that take the `shared_dir` fixture, when HIMAP_SHARED names the folder that holds them
(data/pope, data/scienceqa, data/llava_bench, data/mmvet); CI always sets it (.ci/run). Without
HIMAP_SHARED those tests are skipped; a HIMAP_SHARED that does not hold them stops the run with a
message saying what is wrong.
"""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("HIMAP_TEST_THREADS", "1")))
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
SHARED_FILES = ("data/pope/coco_pope_random.json", "data/scienceqa/llava_test_CQM-A.json",
                "data/llava_bench/questions.jsonl", "data/mmvet/mm-vet.json")
"""What HIMAP_SHARED must hold (relative paths)."""


def shared_problem(path: str) -> str | None:
    """Why `path` is not a usable HIMAP_SHARED folder, or None when it is."""
    if not os.path.isdir(path):
        return f"HIMAP_SHARED={path!r} is not a folder"
    missing = [p for p in SHARED_FILES if not os.path.exists(os.path.join(path, p))]
    if not missing:
        return None
    hint = ""
    if os.path.basename(os.path.normpath(path)) == "data" or os.path.isdir(os.path.join(path, "pope")):
        hint = f" It looks like the data folder itself: set HIMAP_SHARED={os.path.dirname(os.path.normpath(path))!r}."
    return (f"HIMAP_SHARED={path!r} lacks {', '.join(missing)}: it must name the folder that holds "
            f"data/pope, data/scienceqa, data/llava_bench and data/mmvet.{hint} "
            "Unset it to run only the tests on tests/fixtures.")


def pytest_configure(config):
    path = os.environ.get("HIMAP_SHARED")
    if path:
        problem = shared_problem(os.path.abspath(path))
        if problem:
            raise pytest.UsageError(problem)


def pytest_report_header(config):
    path = os.environ.get("HIMAP_SHARED")
    return (f"real benchmark files: {os.path.abspath(path)}" if path else
            "real benchmark files: HIMAP_SHARED not set, tests on them are skipped (fixtures only)")


@pytest.fixture(scope="session")
def shared_dir():
    """The folder holding the real benchmark files (data/...), from HIMAP_SHARED; skips without it."""
    path = os.environ.get("HIMAP_SHARED")
    if not path:
        pytest.skip("needs the real benchmark files: set HIMAP_SHARED to the folder holding data/ (CI does)")
    return os.path.abspath(path)


@pytest.fixture(scope="session")
def fixtures_dir():
    """tests/fixtures: small files in each benchmark's published format, written for this project."""
    return FIXTURES


@pytest.fixture(scope="session")
def image_files(tmp_path_factory):
    """Two small generated images (a red square on white, a blue circle on grey), PNG and JPEG."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("images")
    a = Image.new("RGB", (96, 72), (255, 255, 255))
    ImageDraw.Draw(a).rectangle([20, 14, 60, 54], fill=(220, 30, 30))
    b = Image.new("RGB", (64, 80), (128, 128, 128))
    ImageDraw.Draw(b).ellipse([10, 20, 50, 60], fill=(30, 60, 220))
    paths = [str(root / "square.png"), str(root / "circle.jpg")]
    a.save(paths[0])
    b.save(paths[1])
    return paths
