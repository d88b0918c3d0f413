"""The installation itself: build configuration errors, extension loading, the op registry, doctor."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
import sys

import pytest
import torch

import sparsekern
from sparsekern import _ext, diagnostics as doctor_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_config():
    spec = importlib.util.spec_from_file_location("build_config", os.path.join(ROOT, "tools", "build_config.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["build_config"] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- build configuration


def test_forced_cuda_without_toolkit_says_how_to_fix(tmp_path):
    bc = _build_config()
    env = {"SPARSEKERN_CUDA": "1", "CUDA_HOME": str(tmp_path), "PATH": str(tmp_path)}
    with pytest.raises(bc.BuildConfigError, match=r"no CUDA toolkit was found.*SPARSEKERN_CUDA=0"):
        bc.configure(ROOT, env)


def test_forced_cuda_with_cpu_torch_is_refused():
    bc = _build_config()
    with pytest.raises(bc.BuildConfigError, match=r"CPU-only build \(torch.version.cuda is None\)"):
        bc.decide_cuda({"SPARSEKERN_CUDA": "1"}, torch_cuda=None, nvcc="/usr/local/cuda/bin/nvcc")


def test_cuda_major_mismatch_is_refused():
    bc = _build_config()
    with pytest.raises(bc.BuildConfigError, match=r"torch was built with CUDA 12.8 but nvcc is CUDA 13.0"):
        bc.check_cuda_versions("12.8", "13.0")
    bc.check_cuda_versions("13.0", "13.2")  # same major: fine


def test_bad_cusparselt_path_is_refused(tmp_path):
    bc = _build_config()
    with pytest.raises(bc.BuildConfigError, match=r"CUSPARSELT_PATH=.* does not hold include/cusparseLt.h"):
        bc.find_cusparselt({"CUSPARSELT_PATH": str(tmp_path)})


def test_missing_cusparselt_is_refused(monkeypatch, tmp_path):
    bc = _build_config()
    if not os.path.exists("/usr/local/cuda/bin/nvcc") or torch.version.cuda is None:
        pytest.skip("needs nvcc and a CUDA torch to reach the cuSPARSELt lookup")
    monkeypatch.setattr(bc, "find_cusparselt", lambda env: None)
    env = {"SPARSEKERN_CUDA": "1", "CUDA_HOME": "/usr/local/cuda"}
    with pytest.raises(bc.BuildConfigError, match=r"cuSPARSELt not found.*pip install nvidia-cusparselt-cu13"):
        bc.configure(ROOT, env)


def test_unknown_flag_value_is_refused():
    bc = _build_config()
    with pytest.raises(bc.BuildConfigError, match=r"SPARSEKERN_CUDA='maybe' is not understood"):
        bc.decide_cuda({"SPARSEKERN_CUDA": "maybe"}, torch_cuda="13.0", nvcc=None)


def test_auto_detection_follows_the_toolkit_not_a_gpu():
    bc = _build_config()
    assert bc.decide_cuda({}, torch_cuda="13.0", nvcc="/x/nvcc") is True
    assert bc.decide_cuda({}, torch_cuda="13.0", nvcc=None) is False
    assert bc.decide_cuda({}, torch_cuda=None, nvcc="/x/nvcc") is False
    assert bc.decide_cuda({"SPARSEKERN_CUDA": "0"}, torch_cuda="13.0", nvcc="/x/nvcc") is False


def test_sources_come_from_the_shared_json():
    bc = _build_config()
    spec = bc.load_json(ROOT)
    cfg = bc.configure(ROOT, {"SPARSEKERN_CUDA": "0"})
    assert "csrc/registration.cpp" in cfg.sources
    assert not any(s.endswith(".cu") for s in cfg.sources)
    cmake = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    assert "build_config.json" in cmake and "common_sources" in cmake and "cpu_sources" in cmake
    assert set(spec) >= {"common_sources", "cpu_sources", "cuda_sources", "cxx_flags", "nvcc_flags"}


# ------------------------------------------------------------------------------------------- extension loading


def test_extension_is_loaded_and_reports_its_build():
    assert _ext.available(), _ext.load_error()
    info = _ext.build_info()
    assert info["torch_version"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert isinstance(info["with_cuda"], bool)
    # The CPU kernels split their work with at::parallel_for, whose OpenMP backend is a pragma compiled into them:
    # without -fopenmp every kernel silently ran on one thread.
    assert info["openmp"] is True


def test_symbol_errors_become_sentences():
    msg = _ext._explain(ImportError("_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEa"))
    assert "does not match the installed torch" in msg and "--force-reinstall" in msg
    msg = _ext._explain(ModuleNotFoundError("No module named 'sparsekern._C'"))
    assert "not built" in msg and "pip install --no-build-isolation" in msg
    msg = _ext._explain(OSError("libcusparseLt.so.0: cannot open shared object file"))
    assert "pip install nvidia-cusparselt-cu13" in msg


def test_torch_abi_mismatch_is_detected(monkeypatch):
    class FakeC:
        @staticmethod
        def build_info():
            return {"torch_version": "2.9.0", "with_cuda": False}

    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: FakeC)
    monkeypatch.setattr(_ext, "_load_error", None)
    monkeypatch.setattr(_ext, "_C", None)
    _ext._load()
    assert "built against torch 2.9.0" in _ext.load_error()
    with pytest.raises(_ext.ExtensionMissingError, match="needs sparsekern's compiled extension"):
        _ext.require("prune_nm")


def test_package_imports_without_its_extension():
    code = (
        "import sys; sys.modules['sparsekern._C'] = None\n"
        "import sparsekern\n"
        "from sparsekern import _ext\n"
        "assert not _ext.available()\n"
        "rep = sparsekern.doctor()\n"
        "assert not rep.extension_loaded and rep.problems\n"
        "try:\n"
        "    _ext.require('compress_24')\n"
        "except sparsekern.ExtensionMissingError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR compress_24 needs sparsekern's compiled extension" in out.stdout
    assert "not built" in out.stdout


def test_cuda_feature_on_cpu_build_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(_ext, "build_info", lambda: {"with_cuda": False})
    with pytest.raises(_ext.ExtensionMissingError, match=r"CPU-only.*SPARSEKERN_CUDA=1"):
        _ext.require_cuda("cslt_linear")


# ------------------------------------------------------------------------------------------- op registry

SCHEMA_OPS = [
    "prune_nm", "nm_violation", "compress_24", "decompress_24", "spmm_24", "quantize_per_token",
    "cslt_compress", "cslt_linear",
    "hessian_update_", "act_scale_update_", "wanda_prune", "sparsegpt_prune_block_",
]
CPU_OPS = [op for op in SCHEMA_OPS if not op.startswith("cslt_")]


@pytest.mark.parametrize("op", SCHEMA_OPS)
def test_every_op_has_a_schema_and_a_fake_kernel(op):
    packet = getattr(torch.ops.sparsekern, op)
    assert packet.default._schema.name == f"sparsekern::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "Meta") or (
        torch._library.simple_registry.singleton.find(f"sparsekern::{op}").fake_impl.kernel is not None
    ), f"sparsekern::{op} has no fake kernel"


@pytest.mark.parametrize("op", CPU_OPS)
def test_every_portable_op_has_a_cpu_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CPU")


@pytest.mark.parametrize("op", SCHEMA_OPS)
def test_cuda_build_registers_cuda_kernels(op):
    if not _ext.build_info().get("with_cuda"):
        pytest.skip("CPU-only build: no CUDA kernels to register")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CUDA")


# ------------------------------------------------------------------------------------------- doctor


def test_doctor_reports_truthfully(capsys):
    rep = sparsekern.doctor()
    text = capsys.readouterr().out
    assert rep.extension_loaded and rep.torch_version == torch.__version__
    assert rep.extension_with_cuda == bool(_ext.build_info()["with_cuda"])
    assert ("built with CUDA    yes" in text) == rep.extension_with_cuda
    if not torch.cuda.is_available():
        assert rep.gpus == [] and any("no CUDA GPU visible" in p for p in rep.problems)
    if rep.extension_with_cuda:
        archs = _ext.build_info()["cuda_archs"]
        sass = rep.extension_binary_archs["sass"]
        # Every arch in the build's list must really be in the binary (read from its .nv_fatbin section).
        for a in archs.replace("+PTX", "").split(";"):
            assert f"sm_{a.replace('.', '').rstrip('a')}" in sass, (archs, sass)


def test_doctor_cli_json():
    out = subprocess.run([sys.executable, "-m", "sparsekern", "doctor", "--json"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["torch_version"] == torch.__version__ and "problems" in rep and "ok" in rep


def test_fatbin_reader_on_a_synthetic_blob(tmp_path):
    import struct

    # One fat binary with a SASS sm_80 entry and a PTX compute_90 entry, inside a minimal ELF .nv_fatbin section.
    def entry(kind, arch, payload):
        hdr = struct.pack("<HHIQ", kind, 0, 64, len(payload)) + b"\0" * 12 + struct.pack("<I", arch)
        return hdr + b"\0" * (64 - len(hdr)) + payload

    body = entry(2, 80, b"x" * 16) + entry(1, 90, b"y" * 8)
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    shstr = b"\0.nv_fatbin\0.shstrtab\0"
    data_off = 64
    str_off = data_off + len(fatbin)
    sh_off = str_off + len(shstr)
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, sh_off)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, 3, 2)
    sh = bytearray(64 * 3)
    struct.pack_into("<IIQQQQ", sh, 64, 1, 1, 0, 0, data_off, len(fatbin))
    struct.pack_into("<IIQQQQ", sh, 128, 12, 3, 0, 0, str_off, len(shstr))
    path = tmp_path / "fake.so"
    path.write_bytes(bytes(ehdr) + fatbin + shstr + bytes(sh))
    assert doctor_mod.fatbin_archs(str(path)) == {"sass": ["sm_80"], "ptx": ["compute_90"]}
    (tmp_path / "plain.so").write_bytes(b"not an elf")
    assert doctor_mod.fatbin_archs(str(tmp_path / "plain.so")) == {"sass": [], "ptx": []}


def test_wheel_for_another_torch_names_both_versions(monkeypatch):
    monkeypatch.setattr(_ext, "_built_for_torch", lambda: "2.9")
    msg = _ext._explain(ImportError("_C.so: undefined symbol: _ZN5torch3jit"))
    assert "built for torch 2.9" in msg and f"torch {torch.__version__} is installed" in msg


def test_gpu_arch_coverage_rule():
    binary = {"sass": ["sm_80", "sm_90"], "ptx": []}
    assert doctor_mod._arch_covered((8, 0), binary)
    assert doctor_mod._arch_covered((8, 6), binary)  # sm_80 SASS runs on later minor revisions of sm_8x
    assert doctor_mod._arch_covered((9, 0), binary)
    assert not doctor_mod._arch_covered((7, 5), binary)  # older than anything compiled
    assert not doctor_mod._arch_covered((10, 0), binary)  # newer major, no PTX to JIT from
    assert doctor_mod._arch_covered((10, 0), {"sass": ["sm_80"], "ptx": ["compute_90"]})


def test_doctor_warns_when_the_gpu_arch_is_not_in_the_binary(monkeypatch):
    monkeypatch.setattr(doctor_mod, "_cuda_python_query", lambda: ("13.0", "13.0", [("NVIDIA B200", (10, 0))], None))
    monkeypatch.setattr(doctor_mod._ext, "build_info", lambda: {"with_cuda": True, "cuda_archs": "8.0;9.0a"})
    monkeypatch.setattr(doctor_mod, "fatbin_archs", lambda path: {"sass": ["sm_80", "sm_90"], "ptx": []})
    rep = doctor_mod.collect()
    assert rep.gpus[0].arch_in_binary is False
    assert any("not among the archs compiled" in p and "TORCH_CUDA_ARCH_LIST=10.0" in p for p in rep.problems)


def test_require_cuda_turns_gpu_skips_into_failures(tmp_path):
    # issue 17: on a machine without a usable GPU, `SPARSEKERN_REQUIRE_CUDA=1 pytest -m cuda` must fail, naming why
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the cuda tests would run")
    test = tmp_path / "test_x.py"
    test.write_text("import pytest\n\n@pytest.mark.cuda\ndef test_gpu():\n    pass\n\n"
                    "def test_inline_skip():\n    pytest.skip('no CUDA GPU visible')\n")
    conftest = Path(__file__).with_name("conftest.py")
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    env = dict(os.environ, SPARSEKERN_REQUIRE_CUDA="1", PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", str(test)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0, out.stdout
    assert "SPARSEKERN_REQUIRE_CUDA=1 but this cuda test cannot run" in out.stdout
    assert "a GPU test may not skip" in out.stdout and "1 failed" in out.stdout
    env.pop("SPARSEKERN_REQUIRE_CUDA")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", str(test)], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0 and "2 skipped" in out.stdout, out.stdout
