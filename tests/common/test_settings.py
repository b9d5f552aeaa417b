"""Settings: defaults < env < flags, validation with messages that say what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.adapter_registry.settings import RegistrySettings
from services.inference.settings import InferenceSettings
from services.trainer.settings import TrainerSettings
from tunedock.errors import InvalidArgument


def test_precedence_defaults_env_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDOCK_HOME", str(tmp_path / "home"))
    assert TrainerSettings.load([]).port == 50051
    assert TrainerSettings.load([]).data_dir == tmp_path / "home"
    monkeypatch.setenv("TUNEDOCK_TRAINER_PORT", "6000")
    monkeypatch.setenv("TUNEDOCK_TRAINER_MAX_CONCURRENT_JOBS", "3")
    settings = TrainerSettings.load([])
    assert (settings.port, settings.max_concurrent_jobs) == (6000, 3)
    settings = TrainerSettings.load(["--port", "7000", "--data-dir", str(tmp_path / "flag")])
    assert settings.port == 7000 and settings.max_concurrent_jobs == 3
    assert settings.data_dir == tmp_path / "flag"
    assert settings.database_url == f"sqlite:///{tmp_path / 'flag' / 'trainer' / 'jobs.db'}"


def test_registry_defaults_live_under_data_dir(tmp_path):
    settings = RegistrySettings.load(["--data-dir", str(tmp_path)])
    assert settings.database_url == f"sqlite:///{tmp_path}/registry/registry.db"
    assert Path(settings.blob_url) == tmp_path / "registry" / "blobs"
    assert settings.port == 50052


@pytest.mark.parametrize(
    ("cls", "argv", "message"),
    [
        (TrainerSettings, ["--port", "70000"], "port must be 0..65535, got 70000"),
        (TrainerSettings, ["--log-level", "loud"], "log_level must be one of DEBUG, INFO, WARNING, ERROR, got 'LOUD'"),
        (TrainerSettings, ["--max-concurrent-jobs", "0"], "max_concurrent_jobs must be >= 1, got 0"),
        (InferenceSettings, ["--dtype", "int3"], "dtype must be one of auto, float32, bfloat16, float16, got 'int3'"),
        (InferenceSettings, ["--max-lora-rank", "7"], "max_lora_rank must be one of"),
        (InferenceSettings, ["--kv-cache-gib", "x"], "setting kv_cache_gib: cannot read 'x' as float"),
    ],
)
def test_invalid_settings_are_refused_with_reason(cls, argv, message):
    with pytest.raises(InvalidArgument) as info:
        cls.load(argv)
    assert message in info.value.message


def test_env_value_that_does_not_parse(monkeypatch):
    monkeypatch.setenv("TUNEDOCK_INFERENCE_MAX_LORAS", "many")
    with pytest.raises(InvalidArgument, match="setting max_loras: cannot read 'many' as int"):
        InferenceSettings.load([])


def test_lists_and_booleans_from_env_and_flags_and_code_ignores_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNEDOCK_TRAINER_K8S_NODE_SELECTOR", "pool=gpu, zone=a")
    monkeypatch.setenv("TUNEDOCK_TRAINER_INSECURE", "yes")
    monkeypatch.setenv("TUNEDOCK_TRAINER_MAX_ATTEMPTS", "5")
    settings = TrainerSettings.load(["--k8s-tolerations", "gpu:NoSchedule,spot=true:NoExecute", "--no-insecure"])
    assert settings.k8s_node_selector == ["pool=gpu", "zone=a"]
    assert settings.k8s_tolerations == ["gpu:NoSchedule", "spot=true:NoExecute"]
    assert settings.insecure is False and settings.max_attempts == 5  # the flag wins over the environment
    built = TrainerSettings(data_dir=tmp_path)  # in code: exactly what it names
    assert (built.max_attempts, built.k8s_node_selector, built.insecure) == (3, [], False)


def test_the_help_of_every_flag_is_the_settings_text():
    help_text = " ".join(TrainerSettings.argument_parser().format_help().split())
    assert "--max-dataset-mb MAX_DATASET_MB largest dataset upload accepted, in MiB" in help_text
    assert "--insecure, --no-insecure" in help_text
