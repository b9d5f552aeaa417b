"""Registry, trainer and inference with authentication on, as a deployment runs them.

One token file and one worker key for all three; service tokens for the trainer's and
inference's registry calls; inference on the session's vLLM engine and its event loop
(AsyncLLM is bound to the loop it started on).
"""

from __future__ import annotations

from pathlib import Path

from services.adapter_registry.server import build_server as build_registry
from services.adapter_registry.settings import RegistrySettings
from services.common.server_thread import ServerThread
from services.inference.server import build_server as build_inference
from services.inference.settings import InferenceSettings
from services.trainer.server import build_server as build_trainer
from services.trainer.settings import TrainerSettings
from tunedock.tokenfile import add_token, load_key


class SecuredServices:
    def __init__(
        self,
        home: Path,
        base: Path,
        inference_stack,
        users: dict[str, tuple[list, list]],
        trainer_http: bool = False,
        max_concurrent_jobs: int = 1,
        **inference_limits,
    ) -> None:
        """`users`: name -> (roles, projects); their tokens are in `self.user_tokens`. With `trainer_http` the
        trainer serves its fine-tuning API and inference's HTTP port forwards to it (as `tunedock up`)."""
        self.tokens = home / "tokens.json"
        self.key = home / "worker.key"
        load_key(self.key)
        self.user_tokens = {name: add_token(self.tokens, name, *grant) for name, grant in users.items()}
        service_token = home / "service.token"
        service_token.write_text(add_token(self.tokens, "service", ["registry.read"], ["*"], "service"))
        common = dict(port=0, metrics_port=-1, token_file=str(self.tokens), data_dir=home)
        registry = RegistrySettings(worker_key_file=str(self.key), **common)
        self.registry = ServerThread(lambda: build_registry(registry))
        trainer = TrainerSettings(
            worker_port=0,
            registry_address=self.registry.address,
            registry_token_file=str(service_token),
            worker_key_file=str(self.key),
            default_base_model=str(base),
            max_lora_rank=16,  # as inference's: what the trainer extracts, the replicas can serve
            http_port=0 if trainer_http else -1,
            max_concurrent_jobs=max_concurrent_jobs,
            **common,
        )
        self.trainer = ServerThread(lambda: build_trainer(trainer))
        if trainer_http:
            inference_limits["fine_tuning_url"] = f"http://127.0.0.1:{self.trainer.server.http_port}"
        inference = InferenceSettings(
            base_model=str(base),
            registry_address=self.registry.address,
            registry_token_file=str(service_token),
            max_lora_rank=16,
            max_model_len=512,
            **inference_limits,
            **common,
        )
        engine, loop = inference_stack.engine, inference_stack.inference.loop
        self.inference = ServerThread(lambda: build_inference(inference, engine=engine), loop=loop)

    def stop(self) -> None:
        self.inference.stop()
        self.trainer.stop(grace=0.5)
        self.registry.stop()
