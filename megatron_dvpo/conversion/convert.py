"""HF directory -> megatron dist checkpoint and back, streaming one parameter at a time.

A converted checkpoint directory holds::

    config.yaml       the run config (model section from HF, parallel layout from --tp/--pp)
    model/            megatron-core dist checkpoint (torch_dist), loadable at any TP/PP
    hf_config.json    the source config.json, reused verbatim on export
    tokenizer/        the tokenizer files of the source
    conversion.json   what was converted, from where, and the value head's origin

Both directions write into ``<out>.partial`` and rename at the end: a failure leaves no
half-written output under the final name.
"""

from __future__ import annotations

import ctypes
import json
import shutil
from pathlib import Path

import torch

from megatron_dvpo import distributed
from megatron_dvpo.checkpointing import model_sharded_state_dict, resolve_checkpoint_dir
from megatron_dvpo.config import (ParallelConfig, PrecisionConfig, RunConfig, load_config,
                                  save_config, validate_model)
from megatron_dvpo.conversion.hf_config import hf_config_from_model, model_config_from_hf
from megatron_dvpo.conversion.mapping import (check_keys, find_value_head, stacked_index,
                                              read_megatron, to_hf, weight_rules)
from megatron_dvpo.conversion.safetensors_io import (CheckpointError, SafetensorsReader,
                                                     PlannedTensor, StreamingSafetensorsWriter,
                                                     read_json)
from megatron_dvpo.conversion.streaming import (OnDemandParameters, OnDemandSaveStrategy,
                                                 read_layer)
from megatron_dvpo.logging import Progress
from megatron_dvpo.models import build_chunks
from megatron_dvpo.models.gpt import DTYPES
from megatron_dvpo.models.precision import Hardware, plan_precision
from megatron_dvpo.staging import move_into_place

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt",
                   "added_tokens.json", "generation_config.json")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    if copied:
        dst.mkdir(exist_ok=True)
        for name in copied:
            shutil.copy2(src / name, dst / name)
    return copied


def _export_tokenizer(ckpt: Path, cfg: RunConfig, out: Path) -> None:
    """The checkpoint's own tokenizer copy, else the one its config trained with."""
    source = ckpt / "tokenizer" if (ckpt / "tokenizer").is_dir() else cfg.data.tokenizer
    if source is None:
        return
    source = Path(source)
    if source.is_dir():
        _copy_tokenizer(source, out)
    elif source.suffix == ".model":
        from megatron_dvpo.data.tokenizer import export_hf_tokenizer

        export_hf_tokenizer(source, out)


def _check_tokenizer_fits(hf_dir: Path, model) -> None:
    """The checkpoint's tokenizer must not have more tokens than its embedding has rows."""
    from megatron_dvpo.data.tokenizer import HF_FILES, TokenizerError, check_vocab, load_tokenizer

    if not any((hf_dir / name).is_file() for name in HF_FILES):
        return
    try:
        tokenizer = load_tokenizer(hf_dir)
    except TokenizerError as e:  # e.g. one that needs remote code: say so, and convert anyway
        print(f"warning: the tokenizer was not checked against the vocabulary: {e}",
              flush=True)
        return
    check_vocab(tokenizer, model.vocab_size, f"{hf_dir / 'config.json'}")


def _single_process_world() -> None:
    """Conversion runs as one process; megatron still needs its parallel state."""
    import torch.distributed as dist

    if not dist.is_initialized():
        distributed.init_distributed(ParallelConfig(), seed=0)
    else:
        distributed.set_parallel_layout(ParallelConfig())


MARKER = "conversion.json"  # every output directory of the converters holds one
PARTIAL_MARKER = ".megatron_dvpo_partial"  # marks a staging directory this tool made


def _made_by_converter(directory: Path, direction: str) -> bool:
    marker = directory / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("direction") == direction
    except (json.JSONDecodeError, AttributeError):
        return False


class _Staged:
    """``with _Staged(out, overwrite, direction) as partial:`` publishes on success, cleans up
    on error, and never deletes what this tool did not write.

    ``out`` may be new or an empty directory; with ``overwrite`` it may also be an earlier output
    of the same conversion direction (recognised by its ``conversion.json``). Anything else is
    refused before any work starts.
    """

    def __init__(self, out: Path, overwrite: bool, direction: str):
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--out {out} is a file, not a directory")
        if out.is_dir() and any(out.iterdir()):
            if not _made_by_converter(out, direction):
                raise CheckpointError(f"--out {out} is not empty and was not written by this "
                                      "converter; refusing to touch it (even with --overwrite): "
                                      "choose a new or empty directory")
            if not overwrite:
                raise CheckpointError(f"{out} already holds a checkpoint; pass --overwrite to "
                                      "replace it")
        self.out = out
        self.partial = out.with_name(out.name + ".partial")
        if self.partial.exists() and not (self.partial / PARTIAL_MARKER).is_file():
            raise CheckpointError(f"{self.partial} exists and was not made by this converter; "
                                  "move it away or choose another --out")

    def __enter__(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)  # a staging dir of ours (checked)
        self.partial.mkdir(parents=True)
        (self.partial / PARTIAL_MARKER).touch()
        return self.partial

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.partial, ignore_errors=True)
            return False
        (self.partial / PARTIAL_MARKER).unlink()
        # an existing --out is empty, or our own earlier output (checked in __init__)
        move_into_place(self.partial, self.out, ".replaced")
        return False


def _skeleton(model, precision: PrecisionConfig):
    """A TP=1/PP=1 model whose parameters are allocated but never written, and the layer spec
    it was built with (Transformer Engine's on a GPU with TE, else the local one)."""
    _single_process_world()
    (chunk,) = build_chunks(RunConfig(model=model, precision=precision), initialize=False)
    plan = plan_precision(precision, ParallelConfig(), model, Hardware.detect())
    return chunk, "te" if plan.use_te else "local"


def _write_megatron(directory: Path, chunk, rules, reader: SafetensorsReader, model,
                    label: str, verbose: bool) -> int:
    """Stream every parameter of ``chunk`` from ``reader`` into a dist checkpoint."""
    from megatron.core import dist_checkpointing

    params = dict(chunk.named_parameters())
    by_name = {rule.megatron: rule for rule in rules}
    unmapped = sorted(set(params) - set(by_name))
    if unmapped:
        raise CheckpointError(f"no HF source for megatron parameters {unmapped}")
    total = sum(p.numel() * p.element_size() for p in params.values()) / 2**20
    progress = Progress(label, total, unit="MiB", enabled=verbose)

    def build(name: str) -> torch.Tensor:
        full = torch.empty_like(params[name])
        read_megatron(by_name[name], full, reader, model)
        progress.update(full.numel() * full.element_size() / 2**20, note=name)
        return full

    directory.mkdir()
    strategy = OnDemandSaveStrategy(OnDemandParameters(params, build))
    dist_checkpointing.save(model_sharded_state_dict([chunk]), str(directory),
                            sharded_strategy=strategy)
    return sum(p.numel() for p in params.values())


def import_hf(hf_dir: str | Path, out: str | Path, target: str = "policy", tp: int = 1,
              pp: int = 1, dtype: str | None = None, overwrite: bool = False,
              verbose: bool = True, ep: int = 1) -> Path:
    """Convert an HF directory of a known family (``families/``) into a megatron checkpoint
    directory.

    Everything that can be wrong with the input is checked before anything is written.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{hf_dir} has no config.json")
    if target not in ("policy", "gvm"):
        raise CheckpointError(f"--target must be policy or gvm, got {target!r}")
    for flag, size in (("--tp", tp), ("--pp", pp), ("--ep", ep)):
        if size < 1:
            raise CheckpointError(f"{flag} must be >= 1, got {size}")
    hf = read_json(config_path, "HF config")
    model = model_config_from_hf(hf, config_path)
    # megatron trains MoE layers under TP only with sequence parallelism: recorded with them
    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep,
                              sequence_parallel=bool(model.num_experts) and tp > 1)
    reader = SafetensorsReader(hf_dir)
    ignorable = {k for k in reader.keys() if k.endswith("rotary_emb.inv_freq")}
    value_head = None
    if target == "gvm":
        model.value_head, model.tie_embeddings = True, False
        value_head = find_value_head(reader.keys(), {k: reader.shape(k) for k in reader.keys()})
        if value_head is None or value_head[0] != "lm_head.weight":
            ignorable.add("lm_head.weight")  # the LM head has no place in a value model
    validate_model(model, parallel)
    _check_tokenizer_fits(hf_dir, model)
    check_keys(weight_rules(model, value_head), reader, ignorable)
    torch_dtype = DTYPES[dtype] if dtype else reader.dtype("model.embed_tokens.weight")
    cfg = RunConfig(model=model, parallel=parallel,
                    precision=PrecisionConfig(params_dtype=DTYPE_NAMES[torch_dtype]))

    with _Staged(out, overwrite, "hf_to_megatron") as partial:
        chunk, spec = _skeleton(model, cfg.precision)
        parameters = _write_megatron(partial / "model", chunk,
                                     weight_rules(model, value_head, spec), reader, model,
                                     f"converting {hf_dir.name}", verbose)
        save_config(cfg, partial / "config.yaml")
        shutil.copy2(config_path, partial / "hf_config.json")
        tokenizer = _copy_tokenizer(hf_dir, partial / "tokenizer")
        (partial / MARKER).write_text(json.dumps({
            "direction": "hf_to_megatron", "source": str(hf_dir.resolve()), "target": target,
            "architecture": hf["architectures"][0], "value_head_source": list(value_head or []),
            "tokenizer_files": tokenizer, "parameters": parameters}, indent=2))
    return out


def _write_hf_weights(directory: Path, chunk, spec: str, ckpt: Path, model,
                      max_shard_bytes: int, progress: Progress) -> None:
    """Read one layer's parameter at a time and write its HF tensors at once.

    The shard layout is planned first from the shapes alone (the rules applied to meta
    tensors), so each tensor goes to its file as soon as it is made: one layer's parameter and
    its HF parts are all that is in memory, whatever the model's size.
    """
    rules = weight_rules(model, spec=spec)
    params = dict(chunk.named_parameters())
    unmapped = sorted(set(params) - {rule.megatron for rule in rules})
    if unmapped:  # e.g. a qkv bias on a family whose HF layers have none: never drop weights
        raise CheckpointError(f"{model.hf_architecture} has no HF tensors for megatron "
                              f"parameters {unmapped}")
    sharded = model_sharded_state_dict([chunk])["model"]  # parameter -> checkpoint key
    plan = [PlannedTensor(name, tuple(part.shape), part.dtype) for rule in rules
            for name, part in to_hf(rule, torch.empty_like(params[rule.megatron],
                                                          device="meta"), model).items()]
    writer = StreamingSafetensorsWriter(directory, plan, max_shard_bytes)
    for rule in rules:
        tensor = read_layer(ckpt / "model", sharded[rule.megatron].key,
                            stacked_index(rule.megatron))
        for name, part in to_hf(rule, tensor, model).items():
            writer.write(name, part)
        del tensor
        progress.update(1, note=rule.megatron)
    writer.close()


def export_hf(ckpt: str | Path, out: str | Path, overwrite: bool = False,
              max_shard_bytes: int = 2 * 1024 ** 3, verbose: bool = True) -> Path:
    """Write a converted or trained checkpoint directory as an HF directory.

    A GVM's value head is written under TRL's names (``v_head.summary.{weight,bias}``). A
    training run's save directory stands for its latest checkpoint, as everywhere else.
    """
    ckpt, out = resolve_checkpoint_dir(ckpt, "--ckpt"), Path(out)
    cfg = load_config(ckpt / "config.yaml")
    model = cfg.model
    source = ckpt / "hf_config.json"
    hf = read_json(source, "HF config") if source.is_file() else hf_config_from_model(model)
    hf["architectures"] = [model.hf_architecture]
    dtype_name = str(DTYPES[cfg.precision.params_dtype]).split(".")[-1]
    for key in [k for k in ("torch_dtype", "dtype") if k in hf] or ["torch_dtype"]:
        hf[key] = dtype_name

    with _Staged(out, overwrite, "megatron_to_hf") as partial:
        chunk, spec = _skeleton(model, cfg.precision)
        progress = Progress(f"exporting {ckpt.name}", len(weight_rules(model)),
                            unit="tensors", enabled=verbose)
        _write_hf_weights(partial, chunk, spec, ckpt, model, max_shard_bytes, progress)
        (partial / "config.json").write_text(json.dumps(hf, indent=2))
        _export_tokenizer(ckpt, cfg, partial)
        (partial / MARKER).write_text(json.dumps({
            "direction": "megatron_to_hf", "source": str(ckpt.resolve()),
            "architecture": model.hf_architecture}, indent=2))
    return out


def _return_freed_memory() -> None:
    """Have glibc hand every freed block of 1 MiB or more back to the OS at once. By default it
    keeps blocks of up to 32 MiB in its heap, where an MoE's expert tensors, freed one after
    another, stay resident; a no-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h>'s M_MMAP_THRESHOLD
    libc.mallopt(m_mmap_threshold, 1 << 20)


def run_cli(convert, *args, **kwargs) -> int:
    """Run a conversion for a command line: the output path on success, ``error: ...`` and exit
    status 2 for bad input (nothing is written then)."""
    from megatron_dvpo.errors import input_errors_exit

    _return_freed_memory()
    with input_errors_exit():
        out = convert(*args, **kwargs)
    print(f"wrote {out}")
    return 0
