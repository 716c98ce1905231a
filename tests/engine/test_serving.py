"""Hot swap in one process: leases keep requests on their version; adapter versions decode on the
base's weights (Llama family) or are merged into recycled buffers (other models)."""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file, save_file

from app.config import Settings
from app.engine.checkpoints import MANIFEST, sha256_file
from app.engine.decoders import decoder_for
from app.engine.loading import load_model
from app.engine.lora import ADAPTER_WEIGHTS, merge_lora
from app.engine.registry import ModelRegistry, ServingVersion
from app.engine.versions import adapter_dtype, load_adapter_version
from app.services.versions import activate, get_by_name
from app.state import app_state
from tests.helpers import publish_adapter

GREEDY = {"prompt": "Tell me about the sea.", "max_new_tokens": 12, "temperature": 0}


def switch_to(client: TestClient, sessions: Any, name: str) -> None:
    """Make `name` active in the database and let this process's follower pick it up."""
    with sessions() as session:
        activate(session, get_by_name(session, name))
    app_state(client.app).follower.sync()


def rewrite_manifest(directory: Path) -> None:
    """Record the files' current hashes, as if they had been written like this."""
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = {name: sha256_file(directory / name) for name in manifest["files"]}
    manifest_path.write_text(json.dumps(manifest))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def registry(client: TestClient) -> ModelRegistry:
    return app_state(client.app).registry


def peft_merged(base: torch.nn.Module, path: str) -> dict[str, torch.Tensor]:
    """What PEFT itself makes of an adapter on a fresh copy of `base`, in the serving dtype."""
    fresh = copy.deepcopy(base).to(adapter_dtype(next(base.parameters()).dtype))
    return weights(PeftModel.from_pretrained(fresh, path).merge_and_unload())


def on_transformers_forward(model: torch.nn.Module, tokenizer: Any) -> ServingVersion:
    """A base version decoding on transformers' forward, as every architecture outside the
    Llama family does: its adapter versions are merged into copies of its weights."""
    base = ServingVersion(1, "v0", model, tokenizer)
    object.__setattr__(base, "llama", None)
    return base


def logits_of(version: ServingVersion, tokens: list[int]) -> torch.Tensor:
    """The version's next-token logits after `tokens`, on the path it serves with."""
    return decoder_for(version).prefill([torch.tensor(tokens)])[0].float()


def test_an_adapter_version_decodes_on_the_base_weights_as_the_merged_model(
    sessions: Any, settings: Settings, client: TestClient
) -> None:
    """On the Llama-family path an adapter version copies no weights: its update is applied
    unmerged, and it gives the logits of PEFT's merged model."""
    model, tokenizer = load_model(Path(settings.model), torch.float32)
    base = ServingVersion(1, "v0", model, tokenizer)
    base_before = weights(model)
    with sessions() as session:
        row = get_by_name(session, publish_adapter(sessions, settings, 1))
    version = load_adapter_version(row, base, spare=lambda: pytest.fail("nothing to recycle"))
    assert version.shares_base and version.model is model and not version.recyclable
    merged = copy.deepcopy(model)
    merged.load_state_dict(peft_merged(model, row.path))
    tokens = tokenizer("Tell me about the sea.")["input_ids"]
    with torch.inference_mode():
        want = merged(torch.tensor([tokens])).logits[0, -1]
    got, unadapted = logits_of(version, tokens), logits_of(base, tokens)
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, unadapted, atol=1e-2)
    assert same(weights(model), base_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_recycled_buffer_holds_exactly_what_peft_merges(
    sessions: Any, settings: Settings, client: TestClient, dtype: torch.dtype
) -> None:
    """The direct merge into a retired model's memory gives PEFT's weights bit for bit."""
    model, tokenizer = load_model(Path(settings.model), dtype)
    base = on_transformers_forward(model, tokenizer)
    base_before = weights(model)
    with sessions() as session:
        rows = [get_by_name(session, publish_adapter(sessions, settings, s)) for s in (1, 2)]
    expected = [peft_merged(model, row.path) for row in rows]

    first = load_adapter_version(rows[0], base)
    second = load_adapter_version(rows[1], base, spare=lambda: first.model)

    assert second.model is first.model  # recycled, not allocated
    assert second.model.dtype == torch.float32  # a bfloat16 base serves adapters in float32
    assert same(weights(second.model), expected[1])
    assert not same(expected[0], expected[1])
    assert same(weights(model), base_before)
    again = load_adapter_version(rows[0], base, spare=lambda: second.model)
    assert same(weights(again.model), expected[0])


def test_a_small_update_survives_on_a_bfloat16_base(
    sessions: Any, settings: Settings, client: TestClient
) -> None:
    """Merged in float32, every adapted weight moves; merged into bfloat16, most would not."""
    model, tokenizer = load_model(Path(settings.model), torch.bfloat16)
    base = on_transformers_forward(model, tokenizer)
    with sessions() as session:
        row = get_by_name(session, publish_adapter(sessions, settings, 9, scale=1e-3))
    served = load_adapter_version(row, base).model.model.layers[0].self_attn.q_proj.weight
    original = model.model.layers[0].self_attn.q_proj.weight.float()
    moved = (served != original).float().mean().item()
    in_bf16 = served.to(torch.bfloat16) != model.model.layers[0].self_attn.q_proj.weight
    assert moved > 0.9 and in_bf16.float().mean().item() < 0.5 * moved


def test_adapters_beyond_plain_lora_are_merged_by_peft(
    sessions: Any, settings: Settings, client: TestClient
) -> None:
    """A DoRA adapter (which the direct merge does not handle) still serves PEFT's weights."""
    model, tokenizer = load_model(Path(settings.model), torch.float32)
    base = ServingVersion(1, "v0", model, tokenizer)
    name = publish_adapter(sessions, settings, 3, use_dora=True)
    with sessions() as session:
        row = get_by_name(session, name)
    assert not merge_lora(copy.deepcopy(model), Path(row.path))
    built = load_adapter_version(row, base, spare=lambda: copy.deepcopy(model))
    assert not built.shares_base
    assert same(weights(built.model), peft_merged(model, row.path))


def test_an_adapter_for_another_model_is_refused(
    sessions: Any, settings: Settings, client: TestClient, admin: dict[str, str],
    registry: ModelRegistry,
) -> None:  # fmt: skip
    """Weights whose shapes do not fit the base: refused with the reason, serving goes on."""
    name = publish_adapter(sessions, settings, 4)
    with sessions() as session:
        row = get_by_name(session, name)
    path = Path(row.path) / ADAPTER_WEIGHTS
    tensors = load_file(str(path))
    save_file({k: torch.cat([v, v]) for k, v in tensors.items()}, str(path))
    rewrite_manifest(Path(row.path))
    switch_to(client, sessions, name)
    models = {m["name"]: m for m in client.get("/v1/models", headers=admin).json()["data"]}
    assert models[name]["status"] == "refused"
    assert "shape" in models[name]["status_reason"]
    assert registry.active.name == "v0"


def test_a_request_in_flight_finishes_on_its_version_through_swaps(
    client: TestClient, admin: dict[str, str], sessions: Any, settings: Settings,
    registry: ModelRegistry,
) -> None:  # fmt: skip
    """A request paused mid-generation keeps its version's weights while two swaps happen."""
    v1, v2, v3 = (publish_adapter(sessions, settings, seed) for seed in (1, 2, 3))
    switch_to(client, sessions, v1)
    expected = client.post("/v1/generate", json=GREEDY, headers=admin).json()
    assert expected["model_version"] == v1
    v1_version = registry.active

    # Pause the next request in its first forward pass on v1.
    started, proceed = threading.Event(), threading.Event()

    def pause(module: torch.nn.Module, args: Any) -> None:
        if not started.is_set():
            started.set()
            assert proceed.wait(60)

    hook = v1_version.model.get_input_embeddings().register_forward_pre_hook(pause)
    result: dict[str, Any] = {}
    request = threading.Thread(
        target=lambda: result.update(client.post("/v1/generate", json=GREEDY, headers=admin).json())
    )
    request.start()
    try:
        assert started.wait(60)
        switch_to(client, sessions, v2)  # v1 is leased: it goes on serving this request
        assert registry.active.name == v2 and registry.active is not v1_version
        v2_version = registry.active
        switch_to(client, sessions, v3)
        assert registry.active.name == v3
    finally:
        proceed.set()
        request.join(60)
        hook.remove()

    assert result["model_version"] == v1
    assert result["output"] == expected["output"]  # greedy: same weights, same answer
    after = client.post("/v1/generate", json=GREEDY, headers=admin).json()
    assert after["model_version"] == v3 and after["output"] != expected["output"]

    # A rollback to the version just retired needs no loading: the same object serves again.
    v3_version = registry.active
    switch_to(client, sessions, v2)
    assert registry.active is v2_version
    switch_to(client, sessions, v3)
    assert registry.active is v3_version
    again = client.post("/v1/generate", json=GREEDY, headers=admin).json()
    assert again["model_version"] == v3 and again["output"] == after["output"]

    # v1 was dropped from memory (one retired version is kept); rebuilt, it answers as it did.
    switch_to(client, sessions, v1)
    assert registry.active.name == v1 and registry.active is not v1_version
    rebuilt = client.post("/v1/generate", json=GREEDY, headers=admin).json()
    assert rebuilt["model_version"] == v1 and rebuilt["output"] == expected["output"]


def test_the_base_is_never_recycled(
    client: TestClient, sessions: Any, settings: Settings, registry: ModelRegistry
) -> None:
    """Swapping away from the base keeps it intact: it is the reference for every adapter."""
    base = registry.active
    before = weights(base.model)
    for seed in (1, 2, 3):
        switch_to(client, sessions, publish_adapter(sessions, settings, seed))
        assert registry.active is not base
    assert same(weights(base.model), before)
    assert registry.take_spare() is not base.model


def test_retired_versions_kept_are_bounded(
    client: TestClient, sessions: Any, settings: Settings, registry: ModelRegistry
) -> None:
    """At most `keep_retired` old versions stay loaded, so memory does not grow with swaps."""
    loaded = []
    for seed in (1, 2, 3, 4):
        switch_to(client, sessions, publish_adapter(sessions, settings, seed))
        loaded.append(registry.active)
    assert [registry.retired(v.id) is not None for v in loaded] == [False, False, True, False]
    assert registry.retired(loaded[0].id) is None


def test_admins_can_answer_with_a_version_that_is_not_active(
    client: TestClient, admin: dict[str, str], user: dict[str, str], sessions: Any,
    settings: Settings, registry: ModelRegistry,
) -> None:  # fmt: skip
    """`model_version` answers with any servable version, recorded as such; errors are clear."""
    name = publish_adapter(sessions, settings, 6)
    body = {**GREEDY, "model_version": name}
    first = client.post("/v1/generate", json=body, headers=admin)
    assert first.status_code == 200, first.text
    assert first.json()["model_version"] == name
    assert registry.active.name == "v0"  # nothing was activated
    again = client.post("/v1/generate", json=body, headers=admin).json()
    assert again["output"] == first.json()["output"]  # the same weights, kept loaded
    base = client.post("/v1/generate", json={**GREEDY, "model_version": "v0"}, headers=admin)
    assert base.json()["model_version"] == "v0"

    assert client.post("/v1/generate", json=body, headers=user).status_code == 403
    missing = client.post("/v1/generate", json={**GREEDY, "model_version": "v99"}, headers=admin)
    assert missing.status_code == 404 and "v99" in missing.json()["detail"]

    broken = publish_adapter(sessions, settings, 7)
    with sessions() as session:
        (Path(get_by_name(session, broken).path) / ADAPTER_WEIGHTS).write_bytes(b"not weights")
    refused = client.post("/v1/generate", json={**GREEDY, "model_version": broken}, headers=admin)
    assert refused.status_code == 409 and "cannot be served" in refused.json()["detail"]
