"""The build of the C++ extension (loram_fast/build.py): torch's own flags, one build per key, failures remembered
with a one-line reason, announced at WARNING level; backends() reasons stay one short line; a required backend
fails loudly."""
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from loram_fast import _ext, build
from loram_fast.ops import dispatch

ROOT = Path(__file__).resolve().parent.parent


def test_flags_leave_the_standard_to_torch():
    for flag in build.cxx_flags() + build.nvcc_flags() + build.ld_flags():
        assert not flag.startswith("-std") and "fast_math" not in flag


def test_setup_uses_the_same_flags_and_range():
    text = (ROOT / "setup.py").read_text()
    assert "-std" not in text and "fast_math" not in text
    assert 'TORCH_RANGE = "torch>=2.13,<2.15"' in text
    assert "torch>=2.13,<2.15" in (ROOT / "README.md").read_text()


def test_backends_reasons_are_one_short_line():
    for name, ok in dispatch.backends().items():
        assert ok is True or ("\n" not in ok and len(ok) <= 200), (name, ok)


def test_one_line():
    text = "first\n" + "x" * 500
    line = build.one_line(text)
    assert "\n" not in line and len(line) == 200 and line.startswith("first x")


@pytest.fixture
def fake_toolchain(monkeypatch):
    """A cache in a fresh short-named folder and a compile step that fails like torch 2.14's headers under
    -std=c++17."""
    cache = tempfile.mkdtemp(prefix="lf")
    monkeypatch.setenv("LORAM_FAST_CACHE_DIR", cache)
    monkeypatch.setattr(build, "_preflight", lambda cuda: None)
    calls = []
    log = ("Error building extension 'loram_fast_C': [1/3] c++ -MMD -MF ops.o.d -DTORCH_EXTENSION_NAME=x -std=c++17\n"
           "In file included from torch/include/ATen/ATen.h:1:\n"
           "torch/include/ATen/ATen.h:5:2: error: #error C++20 or later compatible compiler is required\n"
           + "note: lots of compiler output\n" * 3000)

    def failing_compile(folder, cuda, arch):
        calls.append(folder)
        raise RuntimeError(log)

    monkeypatch.setattr(build, "_compile", failing_compile)
    yield calls, log
    shutil.rmtree(cache, ignore_errors=True)


def test_failed_build_is_remembered_and_named(fake_toolchain, caplog):
    calls, log = fake_toolchain
    with caplog.at_level(logging.WARNING, logger="loram_fast.build"):
        with pytest.raises(build.BuildError) as first:
            build.build()
    reason = str(first.value)
    assert len(calls) == 1
    assert "\n" not in reason and len(reason) <= 200
    assert "#error C++20 or later compatible compiler is required" in reason and build.RETRY in reason
    log_path = build.build_dir() / "build.log"
    assert str(log_path) in reason and log_path.read_text() == log  # the whole log, in the named file
    announce = [r for r in caplog.records if "compiling the C++" in r.getMessage()]
    assert announce and announce[0].levelno == logging.WARNING and "minutes" in announce[0].getMessage()
    # a later process (here: call) falls back at once, without compiling again
    with pytest.raises(build.BuildError) as second:
        build.build()
    assert str(second.value) == reason and len(calls) == 1
    assert build.remembered_failure() == reason
    # --force retries
    with pytest.raises(build.BuildError):
        build.build(force=True)
    assert len(calls) == 2


def test_cli_reports_a_remembered_failure(fake_toolchain, capsys):
    calls, _ = fake_toolchain
    assert build.main([]) == 1
    assert build.main([]) == 1 and len(calls) == 1
    assert build.main(["--force"]) == 1 and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "build failed" in err[0]  # the remembered failure; fresh ones are logged once


def test_key_follows_torch_sources_and_compiler(tmp_path, monkeypatch):
    base = build.build_key()
    assert build.build_key() == base and len(base) == 16
    assert build.build_key(cuda=True, arch="8.0;9.0") != base
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert build.build_key() != base
    monkeypatch.undo()
    monkeypatch.setenv("CXX", "some-other-compiler")
    assert build.build_key() != base
    monkeypatch.undo()
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    monkeypatch.setattr(build, "CSRC", csrc)
    assert build.build_key() == base
    (csrc / "common.h").write_text((csrc / "common.h").read_text() + "\n// changed\n")
    assert build.build_key() != base


def test_first_error_prefers_the_compiler_and_linker_messages():
    log = ("[4/4] c++ ops.o -shared -lcudart -o x.so\nFAILED: [code=1] x.so\n"
           "/usr/bin/ld: cannot find -lcudart: No such file or directory\ncollect2: error: ld returned 1 exit status\n")
    assert build._first_error(log) == "/usr/bin/ld: cannot find -lcudart: No such file or directory"
    assert build._first_error("a.cu(3): error: identifier x is undefined\n") == "identifier x is undefined"


def test_missing_tools_give_a_reason_without_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAM_FAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    monkeypatch.setattr(build, "_compile", lambda *a: pytest.fail("must not compile"))
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler"):
        build.build()
    assert not (build.build_dir() / "failed").exists()  # nothing to remember: fixing the tool is enough


def test_a_built_extension_is_reused():
    module, reason = _ext.load()
    if module is None:
        pytest.skip(f"no extension here: {reason}")
    if module.__name__ == "loram_fast._C":
        pytest.skip("this install built the extension at install time (setup.py), not through loram_fast.build")
    assert (build.build_dir() / "ok").exists()
    assert build.build() is module  # from the cache: no second compile, no second registration


def test_required_backend_fails_instead_of_skipping():
    env = dict(os.environ, LORAM_FAST_NO_EXT="1", LORAM_FAST_REQUIRE="cpu-ext")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ext.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "required (LORAM_FAST_REQUIRE) but unavailable" in run.stdout


def test_selfcheck_without_a_gpu_says_so_and_passes(capsys):
    from loram_fast import selfcheck

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: selfcheck runs the full GPU verification there")
    assert selfcheck.main(["--device", "cuda"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]
