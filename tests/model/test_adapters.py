"""LoRA checkpoints: save/verify/load round trip, every rejection path, the registry, decoder bases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from driftrec.model.adapters import (
    CONFIG_NAME,
    MANIFEST_NAME,
    WEIGHTS_NAME,
    AdapterRegistry,
    CheckpointError,
    _sha256,
    base_fingerprint,
    create_lora_model,
    find_target_modules,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from driftrec.model.lm import embed_texts
from tests.scorer_support import base_model_and_tokenizer, make_adapter


@pytest.fixture(scope="module")
def base():
    return base_model_and_tokenizer()


@pytest.fixture()
def adir(tmp_path):
    d = tmp_path / "adapters"
    d.mkdir()
    return d


def _rewrite_manifest(path: Path, **changes):
    m = json.loads((path / MANIFEST_NAME).read_text())
    m.update(changes)
    (path / MANIFEST_NAME).write_text(json.dumps(m))


def _rewrite_weights(path: Path, fn):
    tensors = load_file(str(path / WEIGHTS_NAME))
    tensors = fn(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))
    _rewrite_manifest(path, sha256=_sha256(path / WEIGHTS_NAME))  # checksum consistent: other checks must catch it


def test_round_trip_matches_peft_model(base, adir):
    model, tok = base
    path, peft_model = make_adapter(model, adir, "movies", "v1", seed=1)
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME]
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    assert manifest["version"] == "v1" and manifest["domain"] == "movies"
    assert manifest["base_model"]["fingerprint"] == base_fingerprint(model.config)
    assert manifest["sha256"] == _sha256(path / WEIGHTS_NAME)
    assert manifest["training_window"]["events"] == 10 and manifest["metrics"] == {"loss": 0.1}
    assert manifest["created_at"] > 0
    merged, ckpt = load_checkpoint(path, adir, model)
    assert ckpt.version == "v1"
    texts = ["a space opera with robots", "a quiet family drama"]
    ref = embed_texts(peft_model, tok, texts, max_length=32)
    got = embed_texts(merged, tok, texts, max_length=32)
    base_vecs = embed_texts(model, tok, texts, max_length=32)
    assert torch.allclose(ref, got, atol=1e-4)
    assert not torch.allclose(base_vecs, got, atol=1e-3)  # the adapter does change the model
    # relative path (domain/version) and absolute path inside the dir both work
    verify_checkpoint("movies/v1", adir)
    verify_checkpoint(str(path.resolve()), adir)
    with pytest.raises(FileExistsError):
        save_checkpoint(peft_model, adir, "movies", "v1")
    with pytest.raises(ValueError):
        save_checkpoint(peft_model, adir, "movies", "base")  # reserved for the bare base model


@pytest.mark.faults  # issue 9 fault suite
def test_traversal_and_symlinks_rejected(base, adir, tmp_path):
    model, _ = base
    make_adapter(model, adir, "movies", "v1", seed=1)
    outside = tmp_path / "outside" / "movies" / "v9"
    outside.parent.mkdir(parents=True)
    shutil.copytree(adir / "movies" / "v1", outside)
    for bad in ("../outside/movies/v9", "movies/../../outside/movies/v9", str(outside), "/etc"):
        with pytest.raises(CheckpointError) as exc:
            verify_checkpoint(bad, adir)
        assert exc.value.reason == "untrusted", bad
    # a version folder that is a symlink to a checkpoint outside the adapter dir
    os.symlink(outside, adir / "movies" / "v9")
    with pytest.raises(CheckpointError, match="symlink") as exc:
        verify_checkpoint("movies/v9", adir)
    assert exc.value.reason == "untrusted"
    # a symlinked file inside an otherwise normal checkpoint
    link_dir = adir / "movies" / "v2"
    link_dir.mkdir()
    for name in (CONFIG_NAME, MANIFEST_NAME):
        shutil.copy(adir / "movies" / "v1" / name, link_dir / name)
    os.symlink(outside / WEIGHTS_NAME, link_dir / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="symlink"):
        verify_checkpoint("movies/v2", adir)


@pytest.mark.faults  # issue 9 fault suite
def test_pickle_and_unexpected_files_rejected(base, adir):
    model, _ = base
    path, _ = make_adapter(model, adir, "movies", "v1", seed=1)
    (path / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="pickle") as exc:
        verify_checkpoint(path, adir)
    assert exc.value.reason == "untrusted"
    (path / "adapter_model.bin").unlink()
    (path / "extra.py").write_text("print('hi')")
    with pytest.raises(CheckpointError, match="unexpected"):
        verify_checkpoint(path, adir)


def test_manifest_problems_rejected(base, adir):
    model, _ = base
    path, _ = make_adapter(model, adir, "movies", "v1", seed=1)
    original = (path / MANIFEST_NAME).read_text()
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        verify_checkpoint(path, adir)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError) as exc:
        verify_checkpoint(path, adir)
    assert exc.value.reason == "missing_file"
    (path / MANIFEST_NAME).write_text(original)
    _rewrite_manifest(path, version="v2")
    with pytest.raises(CheckpointError, match="names"):
        verify_checkpoint(path, adir)


@pytest.mark.faults  # issue 9 fault suite
def test_checksum_and_corruption_rejected(base, adir):
    model, _ = base
    path, _ = make_adapter(model, adir, "movies", "v1", seed=1)
    blob = bytearray((path / WEIGHTS_NAME).read_bytes())
    blob[-5] ^= 0xFF
    (path / WEIGHTS_NAME).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError) as exc:
        verify_checkpoint(path, adir)
    assert exc.value.reason == "checksum"
    # garbage with a matching checksum: the safetensors parser must refuse it
    (path / WEIGHTS_NAME).write_bytes(b"\xff" * 64)
    _rewrite_manifest(path, sha256=_sha256(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as exc:
        verify_checkpoint(path, adir)
    assert exc.value.reason == "corrupt"


@pytest.mark.faults  # issue 9 fault suite
def test_incompatible_base_rejected(base, adir):
    model, _ = base
    fp = base_fingerprint(model.config)
    path, _ = make_adapter(model, adir, "movies", "v1", seed=1)
    m = json.loads((path / MANIFEST_NAME).read_text())
    _rewrite_manifest(path, base_model={**m["base_model"], "fingerprint": "0" * 16})
    with pytest.raises(CheckpointError, match="fingerprint") as exc:
        verify_checkpoint(path, adir, base_fingerprint=fp)
    assert exc.value.reason == "shape"

    # LoRA r in the config disagrees with the tensors
    path2, _ = make_adapter(model, adir, "movies", "v2", seed=2, r=4)
    cfg = json.loads((path2 / CONFIG_NAME).read_text())
    (path2 / CONFIG_NAME).write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(CheckpointError, match="r=8"):
        load_checkpoint(path2, adir, model)

    # tensors from a base with another hidden size (manifest claims the right base)
    path3, _ = make_adapter(model, adir, "movies", "v3", seed=3, r=4)
    _rewrite_weights(
        path3,
        lambda t: {k: (v[:, :256] if "lora_A" in k else v[:256, :]).contiguous() for k, v in t.items()},
    )
    with pytest.raises(CheckpointError, match="shape") as exc:
        load_checkpoint(path3, adir, model)
    assert exc.value.reason == "shape"

    # a checkpoint with a different, self-consistent r is fine (r is a training choice)
    path4, _ = make_adapter(model, adir, "movies", "v4", seed=4, r=2)
    load_checkpoint(path4, adir, model)

    # tensors for layers the base does not have
    path5, _ = make_adapter(model, adir, "movies", "v5", seed=5)
    _rewrite_weights(path5, lambda t: {**t, **{k.replace("layer.0.", "layer.77."): v.clone() for k, v in t.items() if "layer.0." in k}})
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(path5, adir, model)


def test_registry_versions_active_rollback_and_new_domain(base, adir):
    model, _ = base
    reg = AdapterRegistry(adir)
    assert reg.domains() == [] and reg.active("movies") is None
    make_adapter(model, adir, "movies", "v1", seed=1)
    make_adapter(model, adir, "movies", "v2", seed=2)
    (adir / "movies" / ".tmp-v3-abc").mkdir()  # a half-written checkpoint is invisible
    assert reg.domains() == ["movies"]
    assert [e.version for e in reg.versions("movies")] == ["v1", "v2"]
    assert reg.latest("movies").version == "v2"
    reg.mark_active("movies", "v1")
    reg.mark_active("movies", "v2")
    assert reg.active("movies") == "v2" and reg.previous("movies") == "v1"
    # state survives a restart
    reg2 = AdapterRegistry(adir)
    assert reg2.active("movies") == "v2" and reg2.previous("movies") == "v1"
    assert reg2.mark_rolled_back("movies") == "v1"
    assert reg2.active("movies") == "v1" and reg2.previous("movies") is None
    # a new domain starts from another domain's active adapter
    dest = reg2.start_domain("books", "movies")
    ckpt = verify_checkpoint(dest, adir, base_fingerprint=base_fingerprint(model.config))
    assert ckpt.domain == "books" and ckpt.manifest["parent"] == {"domain": "movies", "version": "v1"}
    assert reg2.describe("books")["versions"][0]["version"] == dest.name


def test_trainer_entry_points(base, adir, tmp_path):
    model, _ = base
    s_r = create_lora_model(model, r=4, alpha=8, dropout=0.0)
    trainable = [n for n, p in s_r.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lora_" in n for n, _ in model.named_parameters())  # the shared base is untouched
    path, _ = make_adapter(model, adir, "movies", "v1", seed=1)
    warm = create_lora_model(model, init_from=path, adapter_dir=adir)
    assert any(p.requires_grad for n, p in warm.named_parameters() if "lora_B" in n)
    ckpt = verify_checkpoint(path, adir)
    sd = {k: v for k, v in warm.state_dict().items() if "lora_B" in k}
    assert any(torch.count_nonzero(v) for v in sd.values())
    with pytest.raises(CheckpointError):
        create_lora_model(model, init_from="../elsewhere/v1", adapter_dir=adir)
    assert ckpt.lora["r"] == 4


def _tiny_decoder(kind: str):
    from transformers import AutoModel, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    else:
        cfg = GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    return AutoModel.from_config(cfg).eval()


@pytest.mark.parametrize("kind,targets", [("llama", ["q_proj", "v_proj"]), ("gpt2", ["c_attn"])])
def test_decoder_bases(kind, targets, adir, base):
    _, tok = base
    model = _tiny_decoder(kind)
    assert find_target_modules(model) == targets
    peft_model = create_lora_model(model, r=2, alpha=4, dropout=0.0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = save_checkpoint(peft_model, adir, "d", kind)
    merged, _ = load_checkpoint(path, adir, model)
    texts = ["hello there", "a longer sentence about films"]
    assert torch.allclose(
        embed_texts(peft_model.eval(), tok, texts, max_length=16), embed_texts(merged, tok, texts, max_length=16), atol=1e-4
    )
    # a decoder checkpoint is refused by a BERT base
    with pytest.raises(CheckpointError):
        load_checkpoint(path, adir, base[0])


def test_registry_state_write_failure_is_loud_and_changes_nothing(tmp_path, monkeypatch):
    """Disk full while recording an activation: the error reaches the caller and the active version
    stays what the disk says (it must not look promoted when it is not)."""
    import errno
    import os as _os

    reg = AdapterRegistry(tmp_path)
    reg.mark_active("d", "v1")
    real_replace = _os.replace

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("driftrec.model.adapters.os.replace", full)
    with pytest.raises(OSError, match="No space"):
        reg.mark_active("d", "v2")
    assert reg.active("d") == "v1" and reg.previous("d") is None
    assert reg.mark_rolled_back("d") is None  # nothing to roll back to: nothing written
    monkeypatch.setattr("driftrec.model.adapters.os.replace", real_replace)
    assert AdapterRegistry(tmp_path).active("d") == "v1"
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.startswith(".")]  # no temp files left behind

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("driftrec.model.adapters.os.replace", read_only)
    reg.mark_active("d", "v3")  # a read-only replica keeps the state in memory
    assert reg.active("d") == "v3" and reg.previous("d") == "v1"


def test_prune_keeps_the_newest_the_active_and_every_rollback_target(base, adir):
    model, _ = base
    reg = AdapterRegistry(adir)
    for n in range(1, 7):
        make_adapter(model, adir, "movies", f"v{n}", seed=n)
    reg.mark_active("movies", "v2")
    reg.mark_active("movies", "v3")  # active v3, rollback target v2
    assert reg.prune("movies", 0) == []  # 0 = keep every version
    assert reg.prune("movies", 2) == ["v1", "v4"]  # older than the newest two (v5, v6), not protected
    assert [e.version for e in reg.versions("movies")] == ["v2", "v3", "v5", "v6"]
    assert sorted(p.name for p in (adir / "movies").iterdir() if p.is_dir()) == ["v2", "v3", "v5", "v6"]
    assert reg.mark_rolled_back("movies") == "v2"  # the rollback target is still a whole checkpoint
    verify_checkpoint(reg.path_for("movies", "v2"), adir, base_fingerprint=base_fingerprint(model.config))
    assert reg.prune("movies", 2) == ["v3"]  # no longer active nor a rollback target
    assert reg.prune("movies", 2) == []


def test_rejection_messages_for_unauthenticated_readers_hold_no_host_paths(tmp_path):
    from driftrec.model.adapters import public_message

    adir = tmp_path / "adapters"
    msg = f"manifest {adir}/movies/v1/manifest.json is too large; checkpoint /etc/secret/x.bin is outside {adir}"
    out = public_message(msg, adir)
    assert str(tmp_path) not in out and "/etc" not in out
    assert out == ("manifest <adapter_dir>/movies/v1/manifest.json is too large; checkpoint <path>/x.bin is outside "
                   "<adapter_dir>")
