"""Hub ids resolve to local snapshots at the edge; offline, the failure names the id."""

import pytest

from sft_jax.hf import hub


def test_local_paths_and_non_ids_pass_through(stories_dir):
    assert hub.resolve_model_dir(str(stories_dir)) == str(stories_dir)
    assert hub.resolve_model_dir("") == ""
    assert hub.resolve_model_dir("/no/such/dir") == "/no/such/dir"  # preflight reports it
    assert hub.looks_like_hub_id("meta-llama/Llama-3.2-1B")
    assert not hub.looks_like_hub_id("just-a-name")


def test_hub_id_fetches_model_files_only(monkeypatch, stories_dir):
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(stories_dir)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_model_dir("karpathy/stories260K") == str(stories_dir)
    assert calls["repo_id"] == "karpathy/stories260K"
    assert "*.safetensors" in calls["allow_patterns"] and "*.bin" not in calls["allow_patterns"]


def test_offline_hub_id_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"not a local directory.*Hugging Face Hub"):
        hub.resolve_model_dir("nobody-here/not-a-model")
