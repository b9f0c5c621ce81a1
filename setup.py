"""Build fastfuse; with the CUDA extension fastfuse._C whenever nvcc is found.

Project metadata lives in pyproject.toml; this file only adds the optional extension.

- nvcc is looked for in $CUDA_HOME/bin, $CUDA_PATH/bin, on PATH, then /usr/local/cuda/bin.
  Without it (or with FASTFUSE_SKIP_CUDA_BUILD=1) nothing is compiled and the pure-Python package
  installs; the "cuda" backend then reports that the extension is not built.
- Every csrc/*.cu is compiled by nvcc (one process per file, in parallel, each splitting its
  arch list over threads) for sm_80, sm_86, sm_89 and sm_90 plus PTX of the highest arch, so
  newer GPUs JIT it. FASTFUSE_CUDA_ARCHS="80;86" (also "8.6", "sm_90", "90+PTX") narrows.
- Every csrc/*.cpp (the pybind11 bindings) is compiled by the host compiler, and all of it is
  linked with the static cudart only: no libtorch, no libcudart.so, so the module imports on a
  machine without a GPU or driver and works with whichever torch is installed.
- A failing CUDA compile fails the build when nvcc is present (CI relies on that), unless
  FASTFUSE_ALLOW_CUDA_FAIL=1, which warns and installs without the extension.
- FASTFUSE_CUDA_FAMILIES="sam" builds only those families (csrc/<family>.cu and
  csrc/<family>_bindings.cpp); MAX_JOBS caps the number of compile processes run at once.

The cpu backend, independent of nvcc:
- Every csrc/cpu/<family>.cpp is compiled by the host C++ compiler (-O3 -std=c++17 -fopenmp, no
  -march=native so a wheel runs on any x86-64; kernels pick AVX2/AVX-512 at run time with
  function multiversioning) into its own module fastfuse._cpu_<family>; csrc/cpu/README.md has
  the conventions. No libtorch: the launchers in fastfuse/cpu/ pass raw pointers.
- FASTFUSE_SKIP_CPU_BUILD=1 skips them. No compiler, or a family that fails to compile, warns and
  installs without that module (the cpu backend then falls back to torch for its ops and
  `fastfuse info` says why), unless FASTFUSE_REQUIRE_CPU_BUILD=1 (CI), which fails the build.
- FASTFUSE_CPU_FAMILIES="selective_scan" builds only those. For development, build in place
  without touching fastfuse/_C: `FASTFUSE_SKIP_CUDA_BUILD=1 python setup.py build_ext --inplace`.
"""
from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple, Optional

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
KERNELS = ROOT / "kernels"
DEFAULT_ARCHS = "80;86;89;90"
EXTENSION_NAME = "fastfuse._C"
CPU_CSRC = CSRC / "cpu"
CPU_EXTENSION_PREFIX = "fastfuse._cpu_"


def log(message: str) -> None:
    print(f"fastfuse setup: {message}", flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


class Arch(NamedTuple):
    number: int  # 80 for sm_80
    ptx: bool    # also embed PTX for this arch


def parse_archs(spec: str) -> list[Arch]:
    """'80;86;89;90' (also '8.0', 'sm_80', '90+PTX'; ';', ',' or spaces between) -> sorted archs.

    PTX is embedded for the archs marked +PTX, or for the highest one if none is marked, so a
    GPU newer than every listed arch can still JIT the kernels.
    """
    archs: dict[int, bool] = {}
    for item in filter(None, re.split(r"[;,\s]+", spec.strip())):
        match = re.fullmatch(r"(?:sm_|compute_)?(\d)\.?(\d)(\+PTX)?", item, flags=re.IGNORECASE)
        if match is None:
            match = re.fullmatch(r"(?:sm_|compute_)?(\d{2})(\d)(\+PTX)?", item, flags=re.IGNORECASE)
            if match is None:
                raise ValueError(f"FASTFUSE_CUDA_ARCHS: cannot read {item!r}; expected entries like "
                                 f"'80', '8.6', 'sm_90' or '90+PTX', separated by ';'")
        number = int(match.group(1) + match.group(2))
        archs[number] = archs.get(number, False) or match.group(3) is not None
    if not archs:
        raise ValueError(f"FASTFUSE_CUDA_ARCHS={spec!r} names no architecture")
    if not any(archs.values()):
        archs[max(archs)] = True
    return [Arch(n, archs[n]) for n in sorted(archs)]


def arch_flags(archs: list[Arch]) -> list[str]:
    """nvcc -gencode flags: SASS for every arch, plus PTX where asked."""
    flags = []
    for arch in archs:
        codes = f"sm_{arch.number}" + (f",compute_{arch.number}" if arch.ptx else "")
        flags.append(f"-gencode=arch=compute_{arch.number},code=[{codes}]")
    return flags


def arch_list_string(archs: list[Arch]) -> str:
    return ";".join(f"{a.number}" + ("+PTX" if a.ptx else "") for a in archs)


def find_nvcc() -> Optional[str]:
    candidates = [os.path.join(os.environ[v], "bin", "nvcc") for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class CudaToolkit(NamedTuple):
    nvcc: str
    include_dir: str  # holds cuda_runtime_api.h
    lib_dir: str      # holds libcudart_static.a


def locate_toolkit(nvcc: str) -> CudaToolkit:
    """Ask nvcc itself where its headers and libraries are (works for wrapper scripts and
    symlinked installs alike), then check the two files the build needs are there."""
    result = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                            capture_output=True, text=True)
    text = result.stdout + result.stderr
    top = re.search(r"^#\$ TOP=(.*)$", text, flags=re.MULTILINE)
    roots = [Path(top.group(1).strip())] if top else []
    roots.append(Path(nvcc).resolve().parent.parent)
    includes = re.findall(r'-I"?([^"\s]+)"?', " ".join(re.findall(r"^#\$ INCLUDES=(.*)$", text, re.MULTILINE)))
    libs = re.findall(r'-L"?([^"\s]+)"?', " ".join(re.findall(r"^#\$ LIBRARIES=(.*)$", text, re.MULTILINE)))
    include_dirs = [Path(p) for p in includes] + [r / "include" for r in roots]
    lib_dirs = [Path(p) for p in libs] + [r / sub for r in roots for sub in ("lib64", "lib")]
    lib_dirs += [d for r in roots for d in sorted((r / "targets").glob("*/lib"))]
    include_dir = next((d for d in include_dirs if (d / "cuda_runtime_api.h").is_file()), None)
    lib_dir = next((d for d in lib_dirs if (d / "libcudart_static.a").is_file()), None)
    if include_dir is None or lib_dir is None:
        raise RuntimeError(f"nvcc at {nvcc} was found but its toolkit is incomplete: "
                           f"cuda_runtime_api.h in {include_dir or 'none of ' + str(include_dirs)}, "
                           f"libcudart_static.a in {lib_dir or 'none of ' + str(lib_dirs)}")
    return CudaToolkit(nvcc, str(include_dir.resolve()), str(lib_dir.resolve()))


def families() -> list[str]:
    """Every kernel family with CUDA code: csrc/<family>.cu."""
    return sorted(p.stem for p in CSRC.glob("*.cu"))


def selected_families() -> list[str]:
    """FASTFUSE_CUDA_FAMILIES="sam;ssim" builds only those (faster when working on one)."""
    spec = os.environ.get("FASTFUSE_CUDA_FAMILIES", "").strip()
    if not spec:
        return families()
    chosen = sorted(set(filter(None, re.split(r"[;,\s]+", spec))))
    unknown = [name for name in chosen if name not in families()]
    if unknown:
        raise ValueError(f"FASTFUSE_CUDA_FAMILIES names {unknown}, which have no csrc/<family>.cu; "
                         f"the families are {families()}")
    return chosen


def cuda_sources() -> list[Path]:
    return [CSRC / f"{name}.cu" for name in selected_families()]


def binding_sources() -> list[Path]:
    """csrc/bindings.cpp (the module) plus each selected family's csrc/<family>_bindings.cpp."""
    chosen = set(selected_families())
    return [p for p in sorted(CSRC.glob("*.cpp"))
            if not p.stem.endswith("_bindings") or p.stem[: -len("_bindings")] in chosen]


def nvcc_command(toolkit: CudaToolkit, archs: list[Arch], source: Path, output: Path, threads: int) -> list[str]:
    cmd = [toolkit.nvcc, "-c", str(source), "-o", str(output), "-O3", "-std=c++17", "-lineinfo",
           "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", f"--threads={threads}",
           f"-I{ROOT}", f"-I{CSRC}", *arch_flags(archs)]
    host_compiler = os.environ.get("CUDAHOSTCXX")
    if host_compiler:
        cmd += ["-ccbin", host_compiler]
    return cmd


def run_nvcc(toolkit: CudaToolkit, archs: list[Arch], source: Path, build_dir: Path, threads: int) -> str:
    """Compile one .cu file; returns the object file. Raises with nvcc's output on failure."""
    build_dir.mkdir(parents=True, exist_ok=True)
    obj = build_dir / (source.stem + ".cu.o")
    cmd = nvcc_command(toolkit, archs, source, obj, threads)
    log(" ".join(cmd))
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source.relative_to(ROOT)} (exit {done.returncode}):\n"
                           f"{done.stdout}{done.stderr}")
    log(f"compiled {source.relative_to(ROOT)} in {time.monotonic() - start:.1f} s")
    return str(obj)


class CudaPlan(NamedTuple):
    toolkit: CudaToolkit
    archs: list[Arch]


def cuda_plan() -> Optional[CudaPlan]:
    """What to build, or None (with the reason printed) to install the pure-Python package."""
    if env_flag("FASTFUSE_SKIP_CUDA_BUILD"):
        log("FASTFUSE_SKIP_CUDA_BUILD is set: not building the CUDA extension")
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        log("nvcc not found (CUDA_HOME, CUDA_PATH, PATH, /usr/local/cuda): installing without the CUDA "
            "extension; the 'cuda' backend will be unavailable, the others work")
        return None
    if not cuda_sources():
        log(f"no CUDA sources in {CSRC}: installing without the CUDA extension")
        return None
    archs = parse_archs(os.environ.get("FASTFUSE_CUDA_ARCHS") or DEFAULT_ARCHS)
    try:
        toolkit = locate_toolkit(nvcc)
    except RuntimeError as exc:
        if not env_flag("FASTFUSE_ALLOW_CUDA_FAIL"):
            raise
        log(f"WARNING: {exc}; FASTFUSE_ALLOW_CUDA_FAIL is set: installing without the CUDA extension")
        return None
    log(f"building {EXTENSION_NAME} ({', '.join(selected_families())}) with {nvcc} for archs {arch_list_string(archs)} "
        f"(headers {toolkit.include_dir}, static cudart from {toolkit.lib_dir})")
    return CudaPlan(toolkit, archs)


def cuda_extension(plan: CudaPlan) -> Extension:
    import pybind11  # a build requirement (pyproject.toml); only needed when compiling

    return Extension(
        EXTENSION_NAME,
        sources=[str(p.relative_to(ROOT)) for p in binding_sources()],
        include_dirs=[str(ROOT), str(CSRC), plan.toolkit.include_dir, pybind11.get_include()],
        library_dirs=[plan.toolkit.lib_dir],
        # Static cudart and what it needs; keep its symbols out of our exported table so they can
        # never interpose on torch's own libcudart.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-fvisibility=hidden"],
        extra_link_args=["-Wl,--exclude-libs,ALL"],
        define_macros=[("FASTFUSE_CUDA_ARCH_LIST", f'"{arch_list_string(plan.archs)}"')],
        depends=[str(p.relative_to(ROOT)) for p in
                 sorted(CSRC.glob("*.h")) + cuda_sources() + sorted(KERNELS.glob("*.cuh"))],
        language="c++",
    )


def cpu_families() -> list[str]:
    """Every family with a CPU kernel: csrc/cpu/<family>.cpp (FASTFUSE_CPU_FAMILIES narrows)."""
    available = sorted(p.stem for p in CPU_CSRC.glob("*.cpp"))
    spec = os.environ.get("FASTFUSE_CPU_FAMILIES", "").strip()
    if not spec:
        return available
    chosen = sorted(set(filter(None, re.split(r"[;,\s]+", spec))))
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"FASTFUSE_CPU_FAMILIES names {unknown}, which have no csrc/cpu/<family>.cpp; "
                         f"the families are {available}")
    return chosen


def cpu_extensions() -> list[Extension]:
    """One pybind11 module fastfuse._cpu_<family> per csrc/cpu/<family>.cpp, or none if skipped."""
    if env_flag("FASTFUSE_SKIP_CPU_BUILD"):
        log("FASTFUSE_SKIP_CPU_BUILD is set: not building the cpu backend's kernels; "
            "its ops will run on the torch reference")
        return []
    try:
        import pybind11  # a build requirement (pyproject.toml)
    except ImportError:
        if env_flag("FASTFUSE_REQUIRE_CPU_BUILD"):
            raise
        log("WARNING: pybind11 is not installed: installing without the cpu backend's kernels")
        return []
    headers = [str(p.relative_to(ROOT)) for p in sorted(CPU_CSRC.glob("*.h"))]
    return [Extension(
        CPU_EXTENSION_PREFIX + family,
        sources=[str((CPU_CSRC / f"{family}.cpp").relative_to(ROOT))],
        include_dirs=[str(CPU_CSRC), pybind11.get_include()],
        # -fopenmp links libgomp, the soname torch's wheel already loads, so one OpenMP runtime
        # serves both; the kernels take their thread count from torch.get_num_threads() per call.
        # -fno-math-errno: sqrt and friends need not set errno, so their loops vectorise (results unchanged).
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden"],
        extra_link_args=["-fopenmp"],
        depends=headers,
        language="c++",
    ) for family in cpu_families()]


class BuildExtWithCuda(build_ext):
    """build_ext that compiles csrc/*.cu (nvcc) and csrc/*.cpp (host compiler) concurrently, then
    links them with the static cudart."""

    plan: Optional[CudaPlan] = None

    def build_extensions(self) -> None:
        # The CUDA extension first, alone: the compiles inside it are already parallel. Then the
        # cpu-backend modules, one host compile each, in parallel (MAX_JOBS caps it).
        self.check_extensions_list(self.extensions)
        cpu = [ext for ext in self.extensions if ext.name.startswith(CPU_EXTENSION_PREFIX)]
        built = [ext for ext in self.extensions if ext not in cpu and self._build_or_skip(ext)]
        workers = max(1, min(len(cpu), int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            cpu_built = list(pool.map(self._build_or_skip, cpu))
        built += [ext for ext, ok in zip(cpu, cpu_built) if ok]
        # An extension dropped (FASTFUSE_ALLOW_CUDA_FAIL, a cpu module that failed to compile) must
        # not be copied or recorded.
        self.extensions = built

    def _build_or_skip(self, ext: Extension) -> bool:
        if ext.name.startswith(CPU_EXTENSION_PREFIX):
            return self._build_cpu_extension(ext)
        if ext.name != EXTENSION_NAME or self.plan is None:
            self.build_extension(ext)
            return True
        start = time.monotonic()
        try:
            self._build_cuda_extension(ext)
        except Exception as exc:
            if not env_flag("FASTFUSE_ALLOW_CUDA_FAIL"):
                raise
            log(f"WARNING: building {EXTENSION_NAME} failed and FASTFUSE_ALLOW_CUDA_FAIL is set; "
                f"installing without it:\n{exc}")
            return False
        log(f"built {EXTENSION_NAME} in {time.monotonic() - start:.1f} s")
        return True

    def _build_cpu_extension(self, ext: Extension) -> bool:
        """A cpu-backend module is optional: without a working compiler the package still installs
        (its ops run on the torch reference), unless FASTFUSE_REQUIRE_CPU_BUILD=1."""
        start = time.monotonic()
        try:
            self.build_extension(ext)
        except Exception as exc:  # CompileError, LinkError, no compiler at all: all mean "not built"
            if env_flag("FASTFUSE_REQUIRE_CPU_BUILD"):
                raise
            log(f"WARNING: building {ext.name} failed ({type(exc).__name__}: {exc}); installing without it: "
                f"the cpu backend's {ext.name[len(CPU_EXTENSION_PREFIX):]} ops will run on the torch reference "
                "(set FASTFUSE_REQUIRE_CPU_BUILD=1 to make this an error)")
            return False
        log(f"built {ext.name} in {time.monotonic() - start:.1f} s")
        return True

    def _build_cuda_extension(self, ext: Extension) -> None:
        sources = cuda_sources()
        cpus = os.cpu_count() or 1
        workers = max(1, min(len(sources) + len(ext.sources), int(os.environ.get("MAX_JOBS", cpus))))
        # nvcc compiles its archs in parallel threads: the longest job, so it may use every core.
        nvcc_threads = max(1, min(len(self.plan.archs), cpus))
        cuda_dir = Path(self.build_temp) / "cuda"
        with ThreadPoolExecutor(max_workers=workers) as pool:
            cuda_jobs = [pool.submit(run_nvcc, self.plan.toolkit, self.plan.archs, src, cuda_dir, nvcc_threads)
                         for src in sources]
            host_jobs = [pool.submit(self._compile_host, ext, src) for src in ext.sources]
            objects = [job.result() for job in host_jobs + cuda_jobs]
        # Everything is compiled: build_extension only links. A copy, so that a second run of
        # this command still sees the original sources; forced, because the objects are new even
        # when no source changed (e.g. another FASTFUSE_CUDA_ARCHS).
        link_only = copy.copy(ext)
        link_only.sources = []
        link_only.extra_objects = list(ext.extra_objects or []) + objects
        self.force = True
        self.build_extension(link_only)

    def _compile_host(self, ext: Extension, source: str) -> str:
        # The same call build_extension makes, for one source, so it can run beside nvcc.
        return self.compiler.compile([source], output_dir=self.build_temp, macros=ext.define_macros,
                                     include_dirs=ext.include_dirs, debug=self.debug,
                                     extra_postargs=ext.extra_compile_args, depends=ext.depends)[0]


def main() -> None:
    plan = cuda_plan()
    BuildExtWithCuda.plan = plan
    extensions = ([cuda_extension(plan)] if plan else []) + cpu_extensions()
    setup(ext_modules=extensions, cmdclass={"build_ext": BuildExtWithCuda})


if __name__ == "__main__":  # also true when pip's build backend runs this file
    main()
