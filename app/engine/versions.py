"""Building servable versions: the base model from its directory, adapter versions on top of it."""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from transformers import PreTrainedModel

from app.engine.checkpoints import verify_checkpoint
from app.engine.loading import load_model, resolve_dtype
from app.engine.registry import ServingVersion

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoredVersion(Protocol):
    """What building a version needs of its record: its id, its name and its directory."""

    @property
    def id(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> str: ...


def build_base_version(
    version_id: int, name: str, path: Path, dtype: str, kv_dtype: str = "float32"
) -> ServingVersion:
    """Load the base model from `path` in `dtype` (a MODEL_DTYPE value) as version `name`, its
    KV caches in `kv_dtype` (a KV_CACHE_DTYPE value)."""
    resolved, resolved_kv = resolve_dtype(dtype), resolve_dtype(kv_dtype)

    def build() -> ServingVersion:
        model, tokenizer = load_model(path, resolved)
        version = ServingVersion(version_id, name, model, tokenizer, kv_dtype=resolved_kv)
        if version.llama is not None and version.llama.four_bit:
            log.info(
                "decode steps run %d projections on 4-bit weights: the checkpoint's weights "
                "already are 4-bit (as from a Q4_1 GGUF), so nothing is lost",
                version.llama.four_bit,
            )
        return version

    return in_short_thread(build)  # called on the event loop's thread, which lives on


def load_adapter_version(
    row: StoredVersion,
    base: ServingVersion,
    spare: Callable[[], PreTrainedModel | None] = lambda: None,
) -> ServingVersion:
    """Verify an adapter version's files and serve it on the base's weights, or on a copy.

    On the Llama-family decode path a plain LoRA adapter is applied unmerged, in float32, on
    top of the base's own decode weights (4-bit or packed bf16): building it copies no weights,
    and it decodes nearly as fast as the base. Otherwise the adapter is merged into a float32
    copy of the base, in the memory of `spare()` (an idle model of the same base) when there is
    one, since allocating a new copy costs more than the merge.
    """
    from peft import PeftModel  # heavy; imported by the follower thread before the first swap

    from app.engine.lora import merge_lora, read_lora

    verify_checkpoint(Path(row.path))
    adapted = None
    if base.llama is not None and (lora := read_lora(base.model, Path(row.path))) is not None:
        adapted = base.llama.adapted(lora)
    if adapted is not None:
        return ServingVersion(
            row.id, row.name, base.model, base.tokenizer, shares_base=True,
            kv_dtype=base.kv_dtype, llama=adapted,
        )  # fmt: skip
    model = _copy_of(base.model, spare(), adapter_dtype(base.model.dtype))
    if not merge_lora(model, Path(row.path)):
        model = PeftModel.from_pretrained(model, row.path).merge_and_unload()
    model.eval()
    # Packing a copy of the weights (allocating and reordering 540 MB in fp32) made a swap take
    # 4.1 s instead of 1.6 s with two processes generating (bench/swap.py, p50).
    return ServingVersion(
        row.id, row.name, model, base.tokenizer, recyclable=True, pack=False,
        kv_dtype=base.kv_dtype,
    )  # fmt: skip


def spare_copy(base: ServingVersion) -> PreTrainedModel:
    """A new copy of the base's weights, in the dtype adapter versions are merged into."""
    return _as(copy.deepcopy(base.model), adapter_dtype(base.model.dtype))


def in_short_thread(work: Callable[[], T]) -> T:
    """Run torch work in a thread that ends with it, and return its result (or raise).

    A long-lived thread that has run parallel torch operations keeps its own OpenMP worker
    pool, and while it lives the generation thread's matrix products run about as slowly as
    on one core (GNU OpenMP throttles its threads once they outnumber the cores). Measured
    here: a 16x576x1536 product took 0.60-0.92 ms in the generation thread when the main
    thread had loaded the model, 0.39-0.44 ms when a short-lived thread had; a batch-16 step
    of the default model, 190 against 110 ms. So nothing but the generation thread runs
    parallel torch work for longer than one task: not the event loop's thread (which loads the
    base), not the follower (which builds versions).
    """
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name="model-build")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter versions merged into a copy of the weights are served in: float32 when
    the base serves in half precision.

    A round's LoRA update is mostly below bfloat16's resolution: merged into bfloat16 weights,
    only 3% of them changed at all (measured). Merged in float32 the whole update is kept; the
    cost is float32 speed for adapter versions (at batch 16 on an AMX CPU, 172 against 270
    tok/s for bfloat16).
    """
    return torch.float32 if base_dtype in (torch.bfloat16, torch.float16) else base_dtype


def _as(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """`model` with its weights in `dtype` (in place when they already are)."""
    torch.nn.Module.to(model, dtype)  # transformers' typing of `.to` rejects a dtype
    return model


def _copy_of(
    model: PreTrainedModel, spare: PreTrainedModel | None, dtype: torch.dtype
) -> PreTrainedModel:
    """The base weights, as `dtype`, in `spare` if it has that layout, else in a new copy."""
    if spare is not None:
        source, target = model.state_dict(), spare.state_dict()
        if source.keys() == target.keys() and all(
            source[k].shape == target[k].shape and target[k].dtype == dtype for k in source
        ):
            with torch.no_grad():  # one call: no per-tensor trips through the interpreter
                torch._foreach_copy_(list(target.values()), list(source.values()))
            return spare
    return _as(copy.deepcopy(model), dtype)
