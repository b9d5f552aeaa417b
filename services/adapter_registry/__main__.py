"""python -m services.adapter_registry"""

from services.adapter_registry.server import build_server
from services.adapter_registry.settings import RegistrySettings
from services.common.server import run_service

if __name__ == "__main__":
    raise SystemExit(run_service(RegistrySettings, build_server))
