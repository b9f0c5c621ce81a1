"""The backend registry: how a call's backend is chosen, and the errors that say why not."""
import pytest
import torch

from fastfuse import backends

CPU = torch.device("cpu")


@pytest.fixture
def toy_op():
    """An op with a torch path and a 32-bit-indexed triton path, registered for one test."""
    name = "toy_registry_op"
    backends.register(name, "torch", "fastfuse.reference.sam:sam_map")
    backends.register(name, "triton", "fastfuse.triton.sam:sam_map_forward")
    yield name
    backends._REGISTRY.pop(name, None)
    backends._PREFERENCE.pop(name, None)


def test_explicit_backend_that_cannot_serve_says_why(toy_op):
    with pytest.raises(backends.BackendUnavailableError, match="not implemented in the 'cuda' backend"):
        backends.resolve(toy_op, "cuda", CPU, 10)
    with pytest.raises(backends.BackendUnavailableError, match="unknown backend 'tpu'"):
        backends.resolve(toy_op, "tpu", CPU, 10)


def test_tensors_over_two_to_the_31_are_refused_by_32_bit_kernels(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    huge = backends.INT32_LIMIT + 1
    with pytest.raises(ValueError, match="32-bit offsets.*2147483648 elements"):
        backends.resolve(toy_op, "triton", CPU, huge)
    # "auto" does not fail: it falls back to a backend that can index them.
    assert backends.resolve(toy_op, "auto", CPU, huge) == "torch"
    assert backends.resolve(toy_op, "auto", CPU, 100) == "triton"


def test_64_bit_kernels_take_large_tensors(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.register(toy_op, "triton", "fastfuse.triton.sam:sam_map_forward", int64_indexing=True)
    assert backends.resolve(toy_op, "triton", CPU, backends.INT32_LIMIT + 1) == "triton"


def test_empty_inputs_use_the_reference(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve(toy_op, "auto", CPU, 0) == "torch"


def test_environment_default_and_its_fallback(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("FASTFUSE_BACKEND", "torch")
    assert backends.resolve(toy_op, "auto", CPU, 100) == "torch"
    # An op with no implementation at all in the environment's backend uses its automatic choice...
    monkeypatch.setenv("FASTFUSE_BACKEND", "cuda")
    assert backends.resolve(toy_op, "auto", CPU, 100) == "triton"
    # ...but a backend the op has and cannot use here is still an error that says why.
    backends.register(toy_op, "cuda", "fastfuse.cuda.sam:sam_map_forward")
    with pytest.raises(backends.BackendUnavailableError, match="needs CUDA tensors"):
        backends.resolve(toy_op, "auto", CPU, 100)


def test_triton_on_cpu_needs_the_interpreter(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.unavailable_reason(toy_op, "triton", CPU)
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert backends.resolve(toy_op, "auto", CPU, 100) == "torch"


def test_a_kernel_module_that_fails_to_import_is_reported(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends.register(toy_op, "triton", "fastfuse.triton.no_such_module:kernel")
    reason = backends.unavailable_reason(toy_op, "triton", CPU)
    assert "fastfuse.triton.no_such_module failed to import" in reason
    assert backends.resolve(toy_op, "auto", CPU, 100) == "torch"


def test_backend_must_be_a_string(toy_op):
    for bad in (None, 1, torch.device("cpu")):
        with pytest.raises(TypeError, match="backend must be a string"):
            backends.resolve(toy_op, bad, CPU, 10)
    import fastfuse
    with pytest.raises(TypeError, match=r"fastfuse.sam_map: backend must be a string.*got None"):
        fastfuse.sam_map(torch.ones(1, 2, 1, 1), torch.ones(1, 2, 1, 1), backend=None)


def test_environment_backend_is_case_insensitive_and_a_typo_is_an_error(toy_op, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for value, chosen in (("TORCH", "torch"), (" Triton ", "triton"), ("", "triton"), ("AUTO", "triton")):
        monkeypatch.setenv("FASTFUSE_BACKEND", value)
        assert backends.resolve(toy_op, "auto", CPU, 100) == chosen, value
    monkeypatch.setenv("FASTFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable FASTFUSE_BACKEND='bogus' is not a backend"):
        backends.resolve(toy_op, "auto", CPU, 100)
    # An explicit backend= does not read the environment.
    assert backends.resolve(toy_op, "torch", CPU, 100) == "torch"


def test_environment_backend_that_cannot_serve_names_the_variable(toy_op, monkeypatch):
    backends.register(toy_op, "cuda", "fastfuse.cuda.sam:sam_map_forward")
    monkeypatch.setenv("FASTFUSE_BACKEND", "cuda")
    with pytest.raises(backends.BackendUnavailableError,
                       match="'cuda' \\(set by the environment variable FASTFUSE_BACKEND\\).*needs CUDA tensors"):
        backends.resolve(toy_op, "auto", CPU, 100)
