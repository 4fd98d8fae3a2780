"""Device discipline: tensors for models and collectives are made on the one ``device()``, and
the process group has a backend for host metadata too. On a CPU both hide (``cuda`` means the
CPU here), so the source itself is audited."""

import ast
from pathlib import Path

from megatron_dvpo.device import process_group_backend

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_dvpo"
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "randint",
             "rand", "randn", "eye", "linspace", "randperm"}
# Host-only tensors, by file and function: they never reach a model or a collective as made
# (host batches move to the device in ``to_device``; module parameters move with the module).
HOST_ONLY = {
    "mcore_compat.py": {"restore_adam_step", "init_adam_state"},  # torch Adam state, on host
    "conversion/safetensors_io.py": {"read", "read_rows_into"},  # staging from disk
    "conversion/streaming.py": {"read_layer"},  # staging from disk
    "cpu_compat.py": {"get_rng_state"},  # the empty CUDA RNG state of a CPU-only run
    "rl/refresh.py": {"_ranked_correctly"},  # scores on host, reduced as a Python float
    "data/dataset.py": {"collate"},  # a host batch
    "models/generation.py": {"left_pad"},  # moved by generate()
    "models/gvm.py": {"__init__"},  # ValueHead parameters, moved with the model
    "gvm/td.py": {"loss_token_count"},  # a host count
}


def factory_calls_without_device():
    """(file, function, line, factory) of every torch.<factory>(...) naming no device."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)
                        and node.func.value.id == "torch" and node.func.attr in FACTORIES
                        and not any(k.arg == "device" for k in node.keywords)):
                    found.append((str(path.relative_to(PACKAGE)), function.name, node.lineno,
                                  node.func.attr))
    return found


def test_tensor_factories_name_a_device():
    offenders = {(f, fn, line, what) for f, fn, line, what in factory_calls_without_device()
                 if fn not in HOST_ONLY.get(f, set())}
    assert not offenders, sorted(offenders)


def test_the_audit_sees_a_factory_without_a_device(tmp_path, monkeypatch):
    """The audit is not vacuous: a bare torch.zeros in a function is reported."""
    import test_device

    (tmp_path / "bad.py").write_text("import torch\n\ndef f():\n    return torch.zeros(3)\n")
    monkeypatch.setattr(test_device, "PACKAGE", tmp_path)
    assert factory_calls_without_device() == [("bad.py", "f", 4, "zeros")]


def test_process_group_backend():
    assert process_group_backend(cuda=True) == "cpu:gloo,cuda:nccl"  # host metadata too
    assert process_group_backend(cuda=False) == "gloo"


def test_collective_helpers_use_the_device(single_rank):
    import torch

    from megatron_dvpo import distributed
    from megatron_dvpo.device import device, to_device

    assert distributed.all_reduce_max(3.0) == 3.0
    batch = to_device({"tokens": torch.zeros(2, 3, dtype=torch.long), "n": 1})
    assert batch["tokens"].device == device() and batch["n"] == 1
