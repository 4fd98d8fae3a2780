"""Shared test helpers: launching real multi-rank runs, and the artifacts many tests share.

The demo's stages 1-5 (``megatron_dvpo.demo.policy_and_gvm``: the synthetic task, a tiny random
Llama imported as policy and zero-head GVM, the SFT policy, its preference pairs, the trained
GVM) and a Bradley-Terry reward model on the same pairs are built once per test session, in one
directory, through the user's command lines; fixtures hand out their paths. Tests write only
to their own directories.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_dvpo.training.job import JobDefaults

REPO = Path(__file__).resolve().parent.parent
NPROC = 2  # the demo's ranks for SFT and sampling


def launch(args: list[str], nproc: int, timeout: int = 600, cwd: Path = REPO):
    """``args`` (a script or ``-m module`` and its arguments) under ``torchrun`` with ``nproc``
    ranks, or as one plain process when ``nproc`` is 1 (torchrun's own start costs 1.4 s);
    fail the test with the output on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--standalone"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"launch {' '.join(args)} at {nproc} ranks failed ({proc.returncode}):\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def resumed_from(run: Path, into: Path, step: int) -> Path:
    """A copy of ``run``'s step-``step`` checkpoint as the latest of ``into``'s save directory:
    a run there resumes at that step as if it had stopped there: one launch fewer than a run
    stopped by ``exit_interval`` (test_dpo.py and test_fault_tolerance.py stop real ones)."""
    from megatron_dvpo.checkpointing import TRACKER, iteration_dir

    saves = into / "checkpoints"
    saves.mkdir(parents=True)
    shutil.copytree(iteration_dir(run / "checkpoints", step), iteration_dir(saves, step))
    (saves / TRACKER).write_text(f"{step}\n")
    return saves


@pytest.fixture
def single_rank():
    """A real one-rank world (gloo on CPU, nccl on GPU) with megatron's parallel state."""
    from megatron_dvpo import cpu_compat, distributed
    from megatron_dvpo.config import ParallelConfig

    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    distributed.init_distributed(ParallelConfig(), seed=1234)
    yield
    distributed.shutdown()
    cpu_compat.uninstall()


@dataclass(frozen=True)
class Task:
    """The shared artifacts' paths (``megatron_dvpo.demo``'s layout)."""

    root: Path

    @property
    def data(self) -> Path:  # train.jsonl (8000 rows), eval.jsonl (400), tokenizer.model
        return self.root / "synthetic"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer.model"

    @property
    def policy(self) -> Path:  # the random policy, imported
        return self.root / "policy"

    @property
    def gvm_init(self) -> Path:  # the random policy's trunk with a zero value head
        return self.root / "gvm_init"

    @property
    def sft(self) -> Path:  # after 100 SFT steps at 2 ranks
        return self.root / "sft" / "checkpoints" / "iter_0000100"

    @property
    def gvm(self) -> Path:  # 300 steps of td_pairwise on the SFT policy's pairs
        return self.root / "gvm" / "checkpoints" / "iter_0000300"

    @property
    def reward_model(self) -> Path:  # 300 steps of Bradley-Terry on the same pairs
        return self.root / "reward_model" / "checkpoints" / "iter_0000300"

    def linked(self, directory: Path) -> Path:
        """``directory`` with the random models' layout (``synthetic/``, ``policy/`` and the
        zero-head ``gvm/``) as links to the shared ones, for a test that writes beside them."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, target in (("synthetic", self.data), ("policy", self.policy),
                             ("gvm", self.gvm_init)):
            (directory / name).symlink_to(target, target_is_directory=True)
        return directory


@contextmanager
def _shared_task(tmp_path_factory, layer: str):
    """The shared artifacts' root, with ``layer``'s lock held: with pytest-xdist the workers
    share one root (the session's base directory above theirs), and the first to need a layer
    builds it while the others wait; the stages' stamps make every later call a no-op. Each
    layer has its own lock, so that a worker needing only the models does not wait for the SFT
    policy and the GVM."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    root = base / "tasks" / "synthetic"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f"synthetic-{layer}.lock")):
        yield root


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Task:
    """Stages 1-3b only: the task's data and the random policy and zero-head GVM."""
    from megatron_dvpo.demo import task_and_models

    with _shared_task(tmp_path_factory, "models") as root:
        task_and_models(root, reuse=True)
    return Task(root)


@pytest.fixture(scope="session")
def task(models, tmp_path_factory) -> Task:
    """The demo's stages 1-5, as ``make demo`` runs them."""
    from megatron_dvpo.demo import policy_and_gvm

    with _shared_task(tmp_path_factory, "task") as root:
        policy_and_gvm(root, NPROC, reuse=True)
    return Task(root)


@pytest.fixture(scope="session")
def reward_model(task, tmp_path_factory) -> Task:
    """PPO's and GRPO's reward model, trained as tools/bench_methods.py trains it."""
    from megatron_dvpo.demo import REWARD_MODEL_STAGE, train_value_model

    with _shared_task(tmp_path_factory, "reward_model") as root:
        train_value_model(root, "reward_model", REWARD_MODEL_STAGE, 300,
                          "gvm.objective=bradley_terry", reuse=True)
    return task


class ScaledLossJob(JobDefaults):
    """A real training job on a tiny policy whose loss is multiplied at chosen updates (NaN: a
    non-finite update; 1e4: a gradient spike); ``overrides``: config keys (dots as written),
    e.g. ``max_bad_steps``. Built under a one-rank world; the loop's checkpoints go to
    ``<tmp_path>/checkpoints``."""

    summary_tags = ()

    def __init__(self, tmp_path: Path, scales: dict[int, float], updates_per_step: int = 1,
                 **overrides):
        from megatron_dvpo.config import load_config
        from megatron_dvpo.distributed import seed_everything
        from megatron_dvpo.models import build_chunks
        from megatron_dvpo.training.trained_model import TrainedModel

        self.cfg = load_config(None, ["model.num_layers=1", "model.vocab_size=100",
                                      "train_steps=30", f"logging.run_dir={tmp_path}",
                                      f"checkpoint.save_dir={tmp_path}/checkpoints",
                                      "data.global_batch_size=4",
                                      "optimizer.lr_decay_style=constant",
                                      *(f"{k}={v}" for k, v in overrides.items())])
        seed_everything(self.cfg.seed)  # the same initial weights in every build
        self.scales, self.per_step, self.updates = scales, updates_per_step, 0
        self.model = TrainedModel(build_chunks(self.cfg), self.cfg.optimizer, self.cfg.parallel,
                                  self.cfg.precision, self.cfg.train_steps * updates_per_step)
        self.units = {"model": self.model}

    def initialize(self):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def step(self, step):
        import torch

        from distributed.losses import mean_logprob_loss
        from megatron_dvpo.models import forward
        from megatron_dvpo.training.loop import StepResult

        results = []
        for _ in range(self.per_step):
            self.updates += 1
            scale = self.scales.get(self.updates, 1.0)
            tokens = torch.randint(0, 100, (4, 8),
                                   generator=torch.Generator().manual_seed(self.updates))
            results.append(self.model.update(
                forward.make_microbatches(2, tokens=tokens), forward.policy_logprobs_head(100),
                mean_logprob_loss(scale)))
        return StepResult({"x/loss": sum(float(o["loss"]) for r in results for o in r.outputs
                                         if r.applied)}, results)


def quick_bench(tmp_path: Path, script: str, *args: str) -> dict:
    """``tools/<script> --quick``'s JSON report (the run must succeed)."""
    import json

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / script), "--quick", "--out",
                           str(out), *args], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


# The slowest files (measured, tests/conftest.py's session fixtures included) start first on
# the two workers of `make test`: started last, one would run on alone at the end. The second
# needs the models only, not the demo stages the first is building.
SLOWEST_FIRST = ["test_bench_methods.py", "test_fault_tolerance.py", "test_dvpo.py",
                 "test_slurm.py", "test_moe.py", "test_run_faults.py", "test_bench_gpu.py",
                 "test_gvm_train.py",
                 "test_rl_equivalence.py", "test_bench_gvm.py", "test_input_errors.py",
                 "test_parallel_equivalence.py", "test_bf16.py", "test_ppo.py",
                 "test_convert.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


def checkpoint_contents(path: Path) -> dict:
    """Everything a training checkpoint holds, as plain objects: each unit's tensors (weights
    and optimizer state, read through torch's DCP reader), train_state.json, and each rank's
    random state."""
    import json

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    contents = {"train_state": json.loads((path / "train_state.json").read_text())}
    for unit in sorted(p for p in path.iterdir() if (p / "metadata.json").is_file()):
        flat = path.parent.parent / f".contents-{path.name}-{unit.name}-{os.getpid()}.pt"
        dcp_to_torch_save(unit, flat)
        contents[unit.name] = torch.load(flat, weights_only=False)
        flat.unlink()
    for rng in sorted((path / "rng").glob("*.pt")):
        contents[f"rng/{rng.name}"] = torch.load(rng, weights_only=False)
    return contents


def assert_identical(expected, got, where: str = "") -> None:
    """Equal, bit for bit: tensors, arrays and nested containers."""
    import numpy as np
    import torch

    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and expected.dtype == got.dtype and torch.equal(
            expected, got), where
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(expected, got), where
    elif isinstance(expected, dict):
        assert expected.keys() == got.keys(), (where, set(expected) ^ set(got))
        for key in expected:
            assert_identical(expected[key], got[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(got), where
        for i, (a, b) in enumerate(zip(expected, got)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert expected == got, (where, expected, got)
